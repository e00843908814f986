"""A request as a simulated replica holds it: sizes, prompt-block hashes, progress."""

from __future__ import annotations

import math

from cpsim.prefix import prompt_block_hashes
from cpsim.types import RequestMetadata
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import Phase

WAITING = 0
RUNNING = 1
PREEMPTED = 2
FINISHED = 3  # status >= FINISHED means done

FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


class SimRequest:
    """One request on a replica. The replica generates exactly ``max_tokens`` output tokens (as
    with ``ignore_eos``). ``block_hashes`` are chained hashes of the prompt's full blocks at the
    replica's block size (empty: no prefix caching for it). ``prompt_cached`` marks a PD DECODE
    hand-off: the prompt's KV cache arrives by transfer, so the request needs blocks for the whole
    prompt to be admitted and its first output token comes from its first step.

    Progress fields (``num_computed_tokens``, ``num_output_tokens``, ...) are written by the
    replica only; while a request sits in the replica's bulk decode set they are brought up to
    date lazily (read them after ``SimReplica.sync``, or from a StepOutcome's finished list).
    Time fields are written by the driver (the SimPy process)."""

    __slots__ = (
        "arrival_time_s",
        "block_hashes",
        "decode_finish_clock",
        "decode_offset",
        "decode_out_offset",
        "finish_reason",
        "finish_time_s",
        "first_token_time_s",
        "held_hashes",
        "kv_arrival_s",
        "lora",
        "max_tokens",
        "num_blocks",
        "num_computed_tokens",
        "num_output_tokens",
        "num_preemptions",
        "num_prefix_hit_tokens",
        "num_prompt_tokens",
        "num_registered_blocks",
        "prompt_cached",
        "request_id",
        "scheduled_before",
        "status",
    )

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        block_hashes: tuple[int, ...] = (),
        prompt_cached: bool = False,
        arrival_time_s: float = 0.0,
        validate: bool = True,
    ) -> None:
        if validate:  # from_metadata passes False: RequestMetadata checked its fields already
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id={request_id!r} must be a non-empty string")
            check_positive("num_prompt_tokens", num_prompt_tokens, integer=True)
            check_positive("max_tokens", max_tokens, integer=True)
            check_non_negative("arrival_time_s", arrival_time_s)
            num_prompt_tokens, max_tokens = int(num_prompt_tokens), int(max_tokens)
            block_hashes, prompt_cached = tuple(block_hashes), bool(prompt_cached)
            arrival_time_s = float(arrival_time_s)
        self.request_id = request_id
        #: the LoRA adapter it runs with (None: the base model); the replica keeps a model
        #: name only when it serves that adapter
        self.lora: str | None = None
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.block_hashes = block_hashes
        self.prompt_cached = prompt_cached
        self.arrival_time_s = arrival_time_s
        self.first_token_time_s: float | None = None
        self.finish_time_s: float | None = None
        self.kv_arrival_s: float | None = None  # a hand-off's KV transfer ended
        self.status = WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0
        self.scheduled_before = False  # admitted at least once (prefix hits counted then)
        self.num_blocks = 0  # blocks held, shared prefix blocks included
        self.held_hashes: list[int] = []  # cached blocks this request references
        self.num_registered_blocks = 0  # prompt blocks already looked at for caching
        self.decode_offset = 0  # bulk decode set: computed tokens = offset + clock
        self.decode_out_offset = 0
        self.decode_finish_clock = -1  # -1: not in the bulk decode set

    @classmethod
    def from_metadata(
        cls,
        meta: RequestMetadata,
        phase: Phase,
        block_size: int,
        arrival_time_s: float = 0.0,
    ) -> SimRequest:
        """The replica-side request for one dispatch: PREFILL generates 1 token, DECODE starts
        from a handed-off prompt, FULL does both; hashes at the replica's block size."""
        req = cls(
            meta.request_id,
            max(1, meta.prompt_tokens),
            1 if phase is Phase.PREFILL else int(meta.max_tokens),
            replica_block_hashes(meta, block_size),
            phase is Phase.DECODE,
            float(arrival_time_s),
            validate=False,
        )
        req.lora = meta.model_name
        return req

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far (what a recompute must cover)."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def is_finished(self) -> bool:
        return self.status >= FINISHED

    def blocks_for(self, num_tokens: int, block_size: int) -> int:
        return math.ceil(num_tokens / block_size)

    def __repr__(self) -> str:
        return (
            f"SimRequest({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"max_tokens={self.max_tokens}, computed={self.num_computed_tokens}, "
            f"out={self.num_output_tokens}, status={self.status})"
        )


def replica_block_hashes(meta: RequestMetadata, block_size: int) -> tuple[int, ...]:
    """Prompt-block hashes at the replica's block size.

    ``cpsim.prefix.prompt_block_hashes`` hashes token ids at any block size, but returns one
    hash per trace block id (``prefix_block_ids``, e.g. Mooncake's 512-token blocks). Here each
    trace block is expanded into ``prefix_block_size_tokens // block_size`` sub-block hashes,
    each derived from (the trace block's chained hash, sub-index), so they chain too; only
    sub-blocks that lie fully inside the prompt are kept."""
    if meta.prefix_block_ids is None and meta.prompt_token_ids is None:
        return ()  # nothing to hash (the common case in length-only workloads)
    hashes = prompt_block_hashes(meta, block_size)
    if meta.prefix_block_ids is None or meta.prefix_block_size_tokens == block_size:
        return hashes
    if meta.prefix_block_size_tokens % block_size:
        raise ValueError(
            f"prefix_block_size_tokens={meta.prefix_block_size_tokens} is not a multiple of "
            f"block_size={block_size}; allowed: block sizes that divide it"
        )
    ratio = meta.prefix_block_size_tokens // block_size
    limit = meta.prompt_tokens // block_size
    out: list[int] = []
    for block_hash in hashes:
        for sub in range(ratio):
            if len(out) >= limit:
                return tuple(out)
            out.append(hash((block_hash, sub)))
    return tuple(out)
