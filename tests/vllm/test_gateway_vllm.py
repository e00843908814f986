"""``cpsim serve`` in front of two real vLLM servers that it launches (cluster/vllm_cpu_tiny_chat):
the official ``openai`` client streams chat and completions through it and gets what the engine
gives directly; /metrics counts every request; an engine killed mid-run loses no request and
its traffic moves to the other; SIGTERM stops the gateway and its engines."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.vllm.conftest import free_base_port, require_vllm_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
#: The console script the README uses, where the package is installed (else the module).
_SCRIPT = Path(sys.executable).with_name("cpsim")
CPSIM_SERVE = [str(_SCRIPT), "serve"] if _SCRIPT.exists() else [
    sys.executable, "-m", "experiments.serve"]
MODEL = "tiny-llama"
ADMIN = {"Authorization": "Bearer admin-key"}


@dataclass
class Served:
    url: str
    engine_ports: list[int]
    process: subprocess.Popen[bytes]
    model_dir: Path  # the engines' model folder, with its made-up tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_pid(port: int) -> int | None:
    """The vLLM API server listening on ``port`` (its process group holds the engine)."""
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"vllm.entrypoints.openai.api_server" in args
            and b"--port" in args
            and args[args.index(b"--port") + 1] == str(port).encode()
        ):
            return int(entry.name)
    return None


def _counts(url: str) -> dict[tuple[str, ...], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name in ("cpsim:requests_total", "cpsim:routing_decisions_total"):
                out[(s.name, *(v for _, v in sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_vllm_server()
    tmp = tmp_path_factory.mktemp("gateway")
    base, port = free_base_port(2), _free_port()
    process = subprocess.Popen(
        [*CPSIM_SERVE, "backend=vllm_http",
         "cluster=vllm_cpu_tiny_chat", f"cluster.vllm.base_port={base}",
         f"cluster.vllm.log_dir={tmp / 'logs'}", "backend.health_interval_s=0.2",
         f"server.port={port}", "server.admin_keys=[admin-key]", "server.shutdown_grace_s=2",
         "server.log_level=warning", f"hydra.run.dir={tmp / 'hydra'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(process.communicate()[0].decode()[-4000:])
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cpsim serve not ready in 400 s"
            time.sleep(0.5)
        yield Served(url, [base, base + 1], process, tmp / "logs" / "model")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        for engine_port in (base, base + 1):
            pid = _server_pid(engine_port)
            if pid is not None:  # the gateway failed to stop it: do not leave it running
                os.killpg(pid, signal.SIGKILL)


def _chat(messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0.0,
            "extra_body": {"ignore_eos": True, "return_token_ids": True}, **kw}


async def _collect(stream: Any) -> tuple[list[int], str, str | None, Any]:
    ids: list[int] = []
    text, finish, usage = "", None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            ids += getattr(choice, "token_ids", None) or []
            delta = getattr(choice, "delta", None)
            text += (delta.content or "") if delta is not None else (choice.text or "")
            finish = choice.finish_reason or finish
    return ids, text, finish, usage


def test_openai_client_streams_chat_and_completions_as_the_engine_answers_them(
    served: Served,
) -> None:
    """One request at a time (each alone in its batch), so that greedy decoding gives the
    same tokens through the gateway and straight from an engine."""

    async def main() -> None:
        via = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
        direct = [
            openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="x", max_retries=0)
            for p in served.engine_ports
        ]
        messages = [{"role": "user", "content": "How do control planes route requests?"}]
        kw = _chat(messages, stream=True, stream_options={"include_usage": True})
        got = await _collect(await via.chat.completions.create(**kw))
        want = [await _collect(await d.chat.completions.create(**kw)) for d in direct]
        ids, text, finish, usage = got
        assert len(ids) == 12 and finish == "length" and text
        assert usage.completion_tokens == 12 and usage.prompt_tokens > 10
        assert any(got[:3] == w[:3] and got[3].model_dump() == w[3].model_dump() for w in want)

        whole = await via.chat.completions.create(**_chat(messages))
        answers = [await d.chat.completions.create(**_chat(messages)) for d in direct]
        assert whole.choices[0].message.content in [a.choices[0].message.content for a in answers]
        assert whole.usage.model_dump() == answers[0].usage.model_dump()
        assert whole.choices[0].finish_reason == "length"

        prompt = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10,
                  "temperature": 0.0, "extra_body": {"ignore_eos": True,
                                                     "return_token_ids": True}}
        got = await _collect(await via.completions.create(**prompt, stream=True))
        want = [await _collect(await d.completions.create(**prompt, stream=True))
                for d in direct]
        assert len(got[0]) == 10 and any(got[:3] == w[:3] for w in want)
        done = await via.completions.create(**prompt)
        assert done.choices[0].text in [w[1] for w in want]
        assert done.usage.completion_tokens == 10 and done.choices[0].finish_reason == "length"

        models = await via.models.list()
        assert [m.id for m in models.data] == [MODEL]
        for client in (via, *direct):
            await client.close()

    asyncio.run(main())


def test_metrics_count_the_requests_sent(served: Served) -> None:
    before = _counts(served.url)
    finished = ("cpsim:requests_total", "finished", "COMPLETED")

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            bodies = [{"model": MODEL, "prompt": f"request {i}", "max_tokens": 8}
                      for i in range(8)]
            answers = await asyncio.gather(*(http.post("/v1/completions", json=b)
                                             for b in bodies))
            bad = await http.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"})
            assert bad.status_code == 404  # refused before the control plane: not counted
            return [a.status_code for a in answers]

    assert asyncio.run(main()) == [200] * 8
    after = _counts(served.url)
    assert after[finished] - before.get(finished, 0.0) == 8
    routed = {k: v - before.get(k, 0.0) for k, v in after.items() if "routing" in k[0]}
    assert sum(routed.values()) == 8


def test_vllm_bench_serve_runs_through_the_gateway_and_its_result_replays(
    served: Served, tmp_path: Path
) -> None:
    """vLLM's own benchmark client, at a Poisson rate, through the gateway: every request
    succeeds, its result file reads as a log whose send times are those the client's seeded
    schedule gives (experiments/vllm_bench.py, ``normalized``), and it replays."""
    from experiments.replay import DEFAULT_COLUMNS, main, read_log
    from experiments.vllm_bench import client_arrivals

    bench = (
        "import sys\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "parser = FlexibleArgumentParser()\n"
        "add_cli_args(parser)\n"
        "main(parser.parse_args(sys.argv[1:]))\n"
    )  # `vllm bench serve`; the console script fails where the distribution is vllm-cpu
    n, rate, seed = 40, 8.0, 3
    run = subprocess.run(
        [sys.executable, "-c", bench, "--backend", "vllm", "--base-url", served.url,
         "--model", MODEL, "--tokenizer", str(served.model_dir), "--dataset-name", "random",
         "--random-input-len", "64", "--random-output-len", "16", "--num-prompts", str(n),
         "--request-rate", str(rate), "--seed", str(seed), "--save-result", "--save-detailed",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json", "--disable-tqdm"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = read_log(tmp_path / "bench.json", DEFAULT_COLUMNS)
    assert len(log) == n and log.attrs["failed"] == 0
    assert (log["output"] == 16).all() and log["tpot_ms"].notna().all()
    drawn = client_arrivals(n, rate, 1.0, seed, "normalized")
    # the client sleeps until each precomputed time: it may send late (by 0.3 s on this
    # busy box, which is why the recorded times are the ones to replay), never early
    # (aligned on the median, in case the first request, the log's time 0, was late)
    late = log["arrival_s"].to_numpy() - drawn
    late -= np.median(late)
    assert np.median(abs(late)) < 0.005 and late.min() > -0.005
    table = main([str(tmp_path / "bench.json"), "--",
                  "cluster=sim_tiny_llama_cpu", "profile=vllm-cpu-tiny-llama-tp1"])  # fmt: skip
    assert table["sim_completed"].tolist() == [n]


def test_an_engine_killed_mid_run_loses_no_request_and_traffic_moves(served: Served) -> None:
    before = _counts(served.url)

    async def main() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:

            async def one(i: int, max_tokens: int) -> int:
                body = {"model": MODEL, "prompt": f"long {i}", "max_tokens": max_tokens,
                        "ignore_eos": True}
                return (await http.post("/v1/completions", json=body)).status_code

            first = [asyncio.create_task(one(i, 400)) for i in range(12)]
            await asyncio.sleep(1.0)
            pid = _server_pid(served.engine_ports[0])
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)  # engine-0 crashes mid-run
            codes = await asyncio.gather(*first)
            for _ in range(100):
                listed = (await http.get("/admin/instances", headers=ADMIN)).json()
                health = {i["instance_id"]: i["is_healthy"] for i in listed}
                if not health["engine-0"]:
                    break
                await asyncio.sleep(0.2)
            assert health == {"engine-0": False, "engine-1": True}
            after = await asyncio.gather(*(one(100 + i, 8) for i in range(6)))
            return codes, after

    codes, after = asyncio.run(main())
    assert after == [200] * 6
    assert set(codes) <= {200, 502} and len(codes) == 12
    counts = _counts(served.url)
    delta = {k: v - before.get(k, 0.0) for k, v in counts.items()}
    ended = sum(v for k, v in delta.items() if k[0] == "cpsim:requests_total")
    assert ended == 18  # each request ended once, in /metrics
    completed = delta.get(("cpsim:requests_total", "finished", "COMPLETED"), 0.0)
    assert completed == codes.count(200) + 6
    # the 6 after the crash all went to engine-1
    routing = {k[1]: v for k, v in delta.items() if k[0] == "cpsim:routing_decisions_total"}
    assert routing.get("engine-1", 0.0) >= 6


def test_sigterm_stops_the_gateway_and_the_engines_it_launched(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    deadline = time.monotonic() + 30
    while _server_pid(served.engine_ports[1]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_pid(served.engine_ports[1]) is None
