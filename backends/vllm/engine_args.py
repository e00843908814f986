"""Engine settings of the live backends: tiny dummy-weight Llama defaults, env, server flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpsim.types import DEFAULT_MAX_NUM_SEQS, ExecutionInstance

#: The repository's conf/vllm_model/ folder: model folders holding only a ``config.json``.
MODEL_ROOT = Path(__file__).resolve().parents[2] / "conf" / "vllm_model"
#: The tiny Llama (hidden 256, 2 layers, vocab 32000) that runs with random weights on a CPU.
TINY_MODEL_DIR = MODEL_ROOT / "tiny-llama"
#: Token ids of prompts sent to the tiny model must stay below its vocabulary size.
TINY_VOCAB_SIZE = 32000

#: Engine arguments that start the tiny model with no download, no tokenizer and no GPU.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {
    "load_format": "dummy",
    "skip_tokenizer_init": True,
    "gpu_memory_utilization": 0.3,
    "enforce_eager": True,
    "max_model_len": 2048,
}

#: Environment every engine needs on a CPU box: 1 GiB of KV cache and no hub access.
DEFAULT_ENV: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def resolve_model_dir(model: str | Path) -> str:
    """A model given as a path, or as a folder name under conf/vllm_model/ (``tiny-llama``);
    anything else (a hub name) is passed on unchanged."""
    path = Path(model)
    if path.is_dir():
        return str(path.resolve())
    local = MODEL_ROOT / str(model)
    if local.is_dir():
        return str(local)
    return str(model)


def engine_args_for(
    model: str | Path = TINY_MODEL_DIR,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``base`` (default: DEFAULT_ENGINE_ARGS) with ``model`` set and ``overrides`` on top."""
    args = dict(DEFAULT_ENGINE_ARGS if base is None else base)
    args["model"] = resolve_model_dir(args.get("model", model))
    args.update(overrides or {})
    args["model"] = resolve_model_dir(args["model"])
    return args


def instance_engine_args(instance: ExecutionInstance) -> dict[str, Any]:
    """The engine arguments an instance's own description sets: ``max_num_seqs``, the
    instance's sequence limit (the seed's ``target_batch_size`` / ``max_parallel_requests``,
    capped by ``max_concurrent_requests``), when its configs give one or its
    ``max_concurrent_requests`` is below vLLM's default; else nothing, leaving vLLM's own."""
    pre, dec = instance.prefilling_config, instance.decoding_config
    explicit = (pre is not None and pre.target_batch_size is not None) or (
        dec is not None and dec.max_parallel_requests is not None
    )
    if explicit or instance.max_concurrent_requests < DEFAULT_MAX_NUM_SEQS:
        return {"max_num_seqs": instance.max_num_seqs}
    return {}


def server_cli_args(engine_args: Mapping[str, Any]) -> list[str]:
    """Engine arguments as ``vllm.entrypoints.openai.api_server`` flags: ``True`` gives a bare
    flag, ``False``/``None`` gives none, dicts are passed as JSON, lists repeat values."""
    import json

    out: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, Mapping):
            out += [flag, json.dumps(dict(value))]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out
