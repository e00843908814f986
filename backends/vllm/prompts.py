"""Prompt token ids for a request: its own ids, or deterministic ids made from its id."""

from __future__ import annotations

import hashlib

import numpy as np

from backends.vllm.engine_args import TINY_VOCAB_SIZE
from cpsim.types import RequestMetadata

#: Ids below this are special tokens (unk, bos, eos) in Llama vocabularies: never synthesized.
FIRST_ORDINARY_ID = 3


def prompt_token_ids(meta: RequestMetadata, vocab_size: int = TINY_VOCAB_SIZE) -> list[int]:
    """``meta.prompt_token_ids`` when given (each checked to be < ``vocab_size``: a larger id
    crashes a vLLM engine that has no tokenizer), else ``num_prompt_tokens`` (at least 1) ids
    drawn from a generator seeded by the request id, so a retry sends the same prompt."""
    if meta.prompt_token_ids is not None:
        ids = [int(t) for t in meta.prompt_token_ids]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt_token_ids of {meta.request_id!r} hold {bad[:5]}; allowed: "
                f"0 <= id < vocab_size={vocab_size}"
            )
        if ids:
            return ids
    num = max(1, meta.prompt_tokens)
    seed = int.from_bytes(hashlib.sha256(meta.request_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(FIRST_ORDINARY_ID, vocab_size, size=num)]
