"""Requests from one batch of sampled columns: the per-request loop of every workload.

Its own module so that the compiled build (``cpsim.compiled``) can compile it; the module
with the ``Workload`` protocol cannot be (mypyc does not compile ``runtime_checkable``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import numpy as np

from cpsim.types import DEFAULT_PREFIX_BLOCK_SIZE_TOKENS, RequestMetadata, RequestPriority
from cpsim.workload.arrivals import FloatArray
from cpsim.workload.mix import RequestMix
from cpsim.workload.traces import IntArray

TimedRequest = tuple[float, RequestMetadata]


_new = object.__new__


def _setter(name: str) -> Callable[[Any, Any], None]:
    """The slot's own setter (a frozen dataclass refuses ``setattr``): about half the cost
    of ``object.__setattr__(meta, name, value)``, which looks the name up each time."""
    setter: Callable[[Any, Any], None] = RequestMetadata.__dict__[name].__set__
    return setter


_SET_REQUEST_ID: Final = _setter("request_id")
_SET_USER_ID: Final = _setter("user_id")
_SET_PRIORITY: Final = _setter("priority")
_SET_SLO_DEADLINE_MS: Final = _setter("slo_deadline_ms")
_SET_MAX_TOKENS: Final = _setter("max_tokens")
_SET_MODEL_NAME: Final = _setter("model_name")
_SET_COST_BUDGET: Final = _setter("cost_budget")
_SET_PARALLELISM_HINT: Final = _setter("parallelism_hint")
_SET_PROMPT: Final = _setter("prompt")
_SET_PROMPT_TOKEN_IDS: Final = _setter("prompt_token_ids")
_SET_NUM_PROMPT_TOKENS: Final = _setter("num_prompt_tokens")
_SET_PREFIX_BLOCK_IDS: Final = _setter("prefix_block_ids")
_SET_PREFIX_BLOCK_SIZE_TOKENS: Final = _setter("prefix_block_size_tokens")


def _request(
    request_id: str,
    user_id: str,
    priority: RequestPriority,
    slo_deadline_ms: float | None,
    max_tokens: int,
    model_name: str | None,
    cost_budget: float | None,
    num_prompt_tokens: int,
    prefix_block_ids: tuple[int, ...] | None,
) -> RequestMetadata:
    """``RequestMetadata(...)`` of these fields, each already of its final type and checked
    (``emit_batch`` says how), set directly: the frozen dataclass's own ``__init__`` and
    ``__post_init__`` cost ~3 us a request, the largest single cost of a compiled run.
    ``tests/test_workload.py`` holds the two constructions equal, field for field."""
    meta: RequestMetadata = _new(RequestMetadata)
    _SET_REQUEST_ID(meta, request_id)
    _SET_USER_ID(meta, user_id)
    _SET_PRIORITY(meta, priority)
    _SET_SLO_DEADLINE_MS(meta, slo_deadline_ms)
    _SET_MAX_TOKENS(meta, max_tokens)
    _SET_MODEL_NAME(meta, model_name)
    _SET_COST_BUDGET(meta, cost_budget)
    _SET_PARALLELISM_HINT(meta, None)
    _SET_PROMPT(meta, None)
    _SET_PROMPT_TOKEN_IDS(meta, None)
    _SET_NUM_PROMPT_TOKENS(meta, num_prompt_tokens)
    _SET_PREFIX_BLOCK_IDS(meta, prefix_block_ids)
    _SET_PREFIX_BLOCK_SIZE_TOKENS(meta, DEFAULT_PREFIX_BLOCK_SIZE_TOKENS)
    return meta


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
    """Requests ``{id_prefix}{first_index + i}`` for one batch of already clipped lengths.

    The first request of the batch is built by ``RequestMetadata``'s checked constructor,
    which validates what the batch shares (model name, cost budget, and the kinds of value
    the mix draws: user ids, priorities); the others by ``_request`` once their own numbers
    pass the same checks (lengths, SLO), and by the checked constructor (which then raises
    its error) if not."""
    columns = mix.sample(mix_rng, prompt_tokens, output_tokens)
    slos = columns.slo_deadline_ms
    users, priorities = columns.user_ids, columns.priorities
    blocks = prefix_blocks
    model, budget = mix.model_name, mix.cost_budget
    models = columns.model_names
    times, prompts, outputs = times_s.tolist(), prompt_tokens.tolist(), output_tokens.tolist()
    if not len(times) == len(prompts) == len(outputs):
        raise ValueError(
            f"a batch of {len(times)} times, {len(prompts)} prompt and {len(outputs)} output "
            "lengths; they must be equal"
        )
    for i in range(len(times)):
        request_id = f"{id_prefix}{first_index + i}"
        slo = None if slos is None else slos[i]
        prompt, output = prompts[i], outputs[i]
        block_ids = None if blocks is None else blocks[i]
        if models is not None:
            model = models[i]
        meta: RequestMetadata
        if (
            i > 0
            and output > 0
            and prompt >= 0
            and (slo is None or slo > 0)
            and (block_ids is None or type(block_ids) is tuple)
            and type(priorities[i]) is RequestPriority
        ):
            meta = _request(
                request_id, users[i], priorities[i], slo, output, model, budget, prompt, block_ids
            )
        else:
            meta = RequestMetadata(
                request_id=request_id,
                user_id=users[i],
                priority=priorities[i],
                slo_deadline_ms=slo,
                max_tokens=output,
                model_name=model,
                cost_budget=budget,
                num_prompt_tokens=prompt,
                prefix_block_ids=block_ids,
            )
        yield times[i], meta
