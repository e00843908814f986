"""Requests from one batch of sampled columns: the per-request loop of every workload.

Its own module so that the compiled build (``cpsim.compiled``) can compile it; the module
with the ``Workload`` protocol cannot be (mypyc does not compile ``runtime_checkable``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cpsim.types import RequestMetadata
from cpsim.workload.arrivals import FloatArray
from cpsim.workload.mix import RequestMix
from cpsim.workload.traces import IntArray

TimedRequest = tuple[float, RequestMetadata]


def emit_batch(
    first_index: int,
    id_prefix: str,
    times_s: FloatArray,
    prompt_tokens: IntArray,
    output_tokens: IntArray,
    mix: RequestMix,
    mix_rng: np.random.Generator,
    prefix_blocks: Sequence[tuple[int, ...] | None] | None = None,
) -> Iterator[TimedRequest]:
    """Requests ``{id_prefix}{first_index + i}`` for one batch of already clipped lengths."""
    columns = mix.sample(mix_rng, prompt_tokens, output_tokens)
    slos = columns.slo_deadline_ms
    blocks = prefix_blocks
    model, budget = mix.model_name, mix.cost_budget
    for i, (t, prompt, output) in enumerate(
        zip(times_s.tolist(), prompt_tokens.tolist(), output_tokens.tolist(), strict=True)
    ):
        yield (
            t,
            RequestMetadata(
                request_id=f"{id_prefix}{first_index + i}",
                user_id=columns.user_ids[i],
                priority=columns.priorities[i],
                slo_deadline_ms=None if slos is None else slos[i],
                max_tokens=output,
                model_name=model,
                cost_budget=budget,
                num_prompt_tokens=prompt,
                prefix_block_ids=None if blocks is None else blocks[i],
            ),
        )
