"""The manager's default backend: simulated replicas advanced to the wall clock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from backends.sim.live import SimBackend
from cpsim import ExecutionInstance, RequestMetadata, RequestStatus, StepBatch
from cpsim.manager import ControlPlaneManager
from cpsim.roofline import RooflineLatencyModel

ROOT = Path(__file__).resolve().parents[1]


def test_default_backend_is_the_simulator() -> None:
    assert ControlPlaneManager().backend.name == "sim"


def test_single_request_latency_is_the_priced_steps_in_simulated_time() -> None:
    async def main() -> float:
        cp = ControlPlaneManager(backend=SimBackend(time_scale=20.0))
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()
        await cp.submit_request(RequestMetadata("r", num_prompt_tokens=512, max_tokens=2))
        assert await cp.wait_for_request("r", timeout_s=10) is RequestStatus.COMPLETED
        ttft = float(cp.get_request_records()["ttft_ms"].iloc[0])
        await cp.stop()
        return ttft

    ttft_ms = asyncio.run(main())
    model = RooflineLatencyModel("llama-3-8b", "A100-80GB")
    prefill_ms = 1000 * model.step_time_s(StepBatch(512, 512 * 512, 0, 1, 0, 0))
    # the manager's clock runs in simulated seconds; wall-clock jitter (x time_scale) adds a bit
    assert prefill_ms <= ttft_ms < prefill_ms + 400


def test_cancel_aborts_in_the_replica_and_crash_requeues() -> None:
    async def main() -> None:
        backend = SimBackend(time_scale=2.0)
        cp = ControlPlaneManager(backend=backend, routing_strategy="round_robin")
        cp.register_instance(ExecutionInstance("a"))
        cp.register_instance(ExecutionInstance("b"))
        await cp.start()
        for i in range(4):
            await cp.submit_request(RequestMetadata(f"r{i}", num_prompt_tokens=64, max_tokens=2000))
        await asyncio.sleep(0.05)
        assert await cp.cancel_request("r0")
        await asyncio.sleep(0.05)  # an abort lands when the engine's step in flight ends
        assert backend.replica_process("a").replica.get("r0") is None
        backend.replica_process("b").crash("test crash")
        await asyncio.sleep(0.05)
        assert not cp.get_instance_metrics("b")["is_healthy"]
        await cp.stop()
        df = cp.get_request_records().set_index("request_id")
        assert df.loc["r0", "status"] == "CANCELLED"
        assert len(df) == 4  # nothing lost: every request reached one terminal state

    asyncio.run(main())


def test_quickstart_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "completed=39 failed=0 cancelled=1" in out
    assert "'routing_strategy': 'prefix_cache_aware'" in out


def test_unregister_mid_decode_fails_its_streams_and_the_simulation_goes_on() -> None:
    """The removed replica's step in flight must not end on an emptied replica (it used to
    raise inside the backend's loop, which then stopped advancing every other replica)."""

    async def main() -> None:
        backend = SimBackend(time_scale=5.0)
        cp = ControlPlaneManager(backend=backend, routing_strategy="round_robin")
        cp.register_instance(ExecutionInstance("a"))
        cp.register_instance(ExecutionInstance("b"))
        await cp.start()
        for i in range(4):
            await cp.submit_request(RequestMetadata(f"r{i}", num_prompt_tokens=64, max_tokens=300))
        await asyncio.sleep(0.1)  # both replicas are in decode runs now
        cp.unregister_instance("a")
        statuses = [await cp.wait_for_request(f"r{i}", timeout_s=20) for i in range(4)]
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        # round robin put r0 and r2 on "a": they had streamed tokens, which cannot be taken
        # back, so they fail; "b" goes on and finishes its own
        assert statuses == [RequestStatus.FAILED, RequestStatus.COMPLETED] * 2
        assert records.loc["r0", "reason"] == "instance a removed"
        assert records.loc["r1", "instance_id"] == "b"

    asyncio.run(main())
