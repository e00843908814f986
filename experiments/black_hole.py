"""Routers under a black hole: one instance of two fails every request a moment after it
arrives (an engine answering 500 at once). Prints, per router, the share of requests that
complete and how many dispatches the black hole swallowed, with outlier ejection on and off
(off, only the error rate counted as load keeps load-aware routers away from it).

    python -m experiments.black_hole [--requests 2000] [--rate 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from backends.sim.cluster import ClusterSimulation, ReplicaSpec
from backends.sim.faults import Fault
from backends.sim.replica import ReplicaConfig
from cpsim.core import ControlPlane, ControlPlaneConfig
from cpsim.models import load_model_spec
from cpsim.outliers import OutlierConfig
from cpsim.profiles import load_profile
from cpsim.types import ExecutionInstance, RequestMetadata
from policies import ROUTERS, make_router
from policies.scheduling.fifo import FIFOPolicy

PROFILE = "vllm-opt-13b-a100-80gb-tp1"


def run(
    router: str, ejection: bool, num_requests: int, rate: float, seed: int = 0
) -> dict[str, object]:
    profile = load_profile(PROFILE)
    model = load_model_spec("opt-13b")
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    requests = [
        (
            float(t),
            RequestMetadata(
                f"r{i}",
                user_id=f"u{i % 50}",
                num_prompt_tokens=int(rng.integers(100, 1500)),
                max_tokens=int(rng.integers(20, 300)),
            ),
        )
        for i, t in enumerate(times)
    ]
    specs = []
    for iid, faults in (("hole", (Fault("fail", at_s=0.0),)), ("good", ())):
        inst = ExecutionInstance(iid, model_name=model.name)
        specs.append(
            ReplicaSpec(inst, profile, model, 20_000, ReplicaConfig.from_instance(inst), faults)
        )
    config = ControlPlaneConfig(outliers=OutlierConfig(enabled=ejection))
    cp = ControlPlane(FIFOPolicy(), make_router(router), config=config)
    df = ClusterSimulation(specs, cp).run(requests).requests
    completed = df["status"].astype(str).eq("COMPLETED")
    # every attempt but a completed request's last one failed on the black hole
    failed_attempts = int(df["attempts"].sum() - completed.sum())
    return {
        "router": router,
        "ejection": "on" if ejection else "off",
        "completed_frac": round(float(completed.mean()), 4),
        "dispatches_to_hole": failed_attempts,
        "ejections": len(cp.metrics.ejections),
        "p99_ttft_ms": round(float(df.loc[completed, "ttft_ms"].quantile(0.99)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    args = parser.parse_args()
    rows = [
        run(router, ejection, args.requests, args.rate)
        for router in sorted(ROUTERS)
        for ejection in (True, False)
    ]
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
