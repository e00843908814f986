"""Locality by consistent hashing onto a ring, with bounded loads: of the prompt prefix (for
the prefix cache), or of the LoRA adapter a request names (to keep each adapter's batches
together)."""

from __future__ import annotations

import bisect
import hashlib
import math
from array import array
from collections.abc import Sequence

from cpsim.types import CHARS_PER_TOKEN_ESTIMATE
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import pick_least_loaded


def stable_hash(data: bytes) -> int:
    """64-bit hash, equal across processes and runs (unlike Python's ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def locality_key(request: RequestView, prefix_tokens: int) -> bytes:
    """What identifies the request's prefix: its first ``prefix_tokens`` token ids, else its
    first trace block ids covering as many tokens, else the start of its prompt text, else
    its user id."""
    meta = request.meta
    if meta.prompt_token_ids:
        return b"t" + array("q", meta.prompt_token_ids[:prefix_tokens]).tobytes()
    if meta.prefix_block_ids:
        num_blocks = max(1, prefix_tokens // meta.prefix_block_size_tokens)
        return b"b" + array("q", meta.prefix_block_ids[:num_blocks]).tobytes()
    if meta.prompt:
        return b"p" + meta.prompt[: prefix_tokens * CHARS_PER_TOKEN_ESTIMATE].encode()
    return b"u" + request.user_id.encode()


class LocalityRouter:
    """Each instance seen so far owns ``virtual_nodes`` points on a hash ring; a request goes
    to the first instance clockwise from its key's hash that is a candidate and would then
    hold at most ceil((1 + epsilon) x (outstanding over candidates + 1) / number of
    candidates) outstanding requests (consistent hashing with bounded loads, Mirrokni et al. 2018).
    Keys are cut to ``prefix_tokens`` so requests sharing a system prompt meet."""

    name = "locality"

    def __init__(
        self, prefix_tokens: int = 256, virtual_nodes: int = 100, epsilon: float = 0.25
    ) -> None:
        check_positive("prefix_tokens", prefix_tokens, integer=True)
        check_positive("virtual_nodes", virtual_nodes, integer=True)
        check_non_negative("epsilon", epsilon)
        self.prefix_tokens = prefix_tokens
        self.virtual_nodes = virtual_nodes
        self.epsilon = epsilon
        self._ring_points: list[int] = []
        self._ring_owners: list[str] = []
        self._known: set[str] = set()

    def _add_instance(self, instance_id: str) -> None:
        self._known.add(instance_id)
        for replica in range(self.virtual_nodes):
            point = stable_hash(f"{instance_id}#{replica}".encode())
            at = bisect.bisect_left(self._ring_points, point)
            self._ring_points.insert(at, point)
            self._ring_owners.insert(at, instance_id)

    def bound(self, candidates: Sequence[InstanceView]) -> int:
        """The most outstanding requests a candidate may hold once it takes this request."""
        total = sum(v.outstanding for v in candidates) + 1
        return math.ceil((1.0 + self.epsilon) * total / len(candidates))

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        key = stable_hash(locality_key(request, self.prefix_tokens))
        return self._on_ring(key, request, candidates)

    def _on_ring(
        self, key: int, request: RequestView, candidates: Sequence[InstanceView]
    ) -> InstanceView | None:
        """The first candidate clockwise from ``key`` within the load bound, else the least
        loaded candidate."""
        for view in candidates:
            if view.instance_id not in self._known:
                self._add_instance(view.instance_id)
        by_id = {v.instance_id: v for v in candidates}
        limit = self.bound(candidates)
        start = bisect.bisect_left(self._ring_points, key)
        tried: set[str] = set()
        n = len(self._ring_points)
        for step in range(n):
            owner = self._ring_owners[(start + step) % n]
            if owner in tried:
                continue
            tried.add(owner)
            owner_view = by_id.get(owner)
            if owner_view is not None and owner_view.outstanding < limit:
                return owner_view
            if len(tried) == len(self._known):
                break
        return pick_least_loaded(candidates, request.parallelism_hint)


class AdapterAffinityRouter(LocalityRouter):
    """Keeps each LoRA adapter on few instances: a request naming an adapter goes to the
    adapter's place on the hash ring among the candidates, spilling past the load bound as
    ``LocalityRouter`` does, so an adapter spreads over as many instances as its load needs
    and an engine's batches mix few adapters (vLLM runs at most ``--max-loras`` at once and
    makes the others wait). A request for a base model goes to the least loaded candidate."""

    name = "lora_affinity"

    def __init__(self, virtual_nodes: int = 100, epsilon: float = 0.25) -> None:
        super().__init__(virtual_nodes=virtual_nodes, epsilon=epsilon)

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        model = request.model_name
        if model is None or model not in candidates[0].adapters:  # candidates all serve it
            return pick_least_loaded(candidates, request.parallelism_hint)
        return self._on_ring(stable_hash(b"a" + model.encode()), request, candidates)
