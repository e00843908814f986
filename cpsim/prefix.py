"""Chained hashes of prompt blocks, for prefix-aware routers and the simulated prefix cache."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from cpsim.types import RequestMetadata
from cpsim.validation import check_positive

_HASH_BYTES = 8
# Domain tags keep token-block hashes and trace-block-id hashes from ever colliding.
_TOKENS_TAG = b"tok"
_IDS_TAG = b"ids"


def _chain(previous: int, tag: bytes, payload: bytes) -> int:
    digest = hashlib.blake2b(
        previous.to_bytes(_HASH_BYTES, "little") + tag + payload, digest_size=_HASH_BYTES
    ).digest()
    return int.from_bytes(digest, "little")


def _int64_bytes(values: Sequence[int], field_name: str) -> bytes:
    try:
        return array("q", values).tobytes()
    except OverflowError:
        raise ValueError(f"{field_name} holds an id outside the signed 64-bit range") from None


def prompt_block_hashes(meta: RequestMetadata, block_size_tokens: int) -> tuple[int, ...]:
    """One hash per full prompt block, each covering all blocks before it, so equal hashes
    at position i mean equal prompts up to the end of block i (up to hash collisions).

    ``meta.prefix_block_ids`` (a trace's block ids, each one block already) win over
    ``meta.prompt_token_ids``, which are cut into ``block_size_tokens`` blocks; a trailing
    partial block is not hashed, as engines cache full blocks only. No ids: empty tuple.
    """
    check_positive("block_size_tokens", block_size_tokens, integer=True)
    hashes: list[int] = []
    previous = 0
    if meta.prefix_block_ids is not None:
        for block_id in meta.prefix_block_ids:
            previous = _chain(previous, _IDS_TAG, _int64_bytes((block_id,), "prefix_block_ids"))
            hashes.append(previous)
        return tuple(hashes)
    ids = meta.prompt_token_ids
    if ids is None:
        return ()
    for start in range(0, len(ids) - block_size_tokens + 1, block_size_tokens):
        block = _int64_bytes(ids[start : start + block_size_tokens], "prompt_token_ids")
        previous = _chain(previous, _TOKENS_TAG, block)
        hashes.append(previous)
    return tuple(hashes)
