"""The SimPy simulator: simulated vLLM replicas (one SimPy process each), faults and KV capacity."""

from __future__ import annotations

from backends.sim.block_manager import BlockPool
from backends.sim.faults import Fault
from backends.sim.kv_capacity import num_kv_blocks
from backends.sim.process import ReplicaProcess
from backends.sim.replica import ReplicaConfig, SimReplica
from backends.sim.request import SimRequest, replica_block_hashes
from backends.sim.step import StepOutcome, StepPlan

__all__ = [
    "BlockPool",
    "Fault",
    "ReplicaConfig",
    "ReplicaProcess",
    "SimReplica",
    "SimRequest",
    "StepOutcome",
    "StepPlan",
    "num_kv_blocks",
    "replica_block_hashes",
]
