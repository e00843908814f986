"""GPU specifications (peak bf16 FLOP/s, memory, bandwidths), loaded from data files."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from cpsim.validation import check_positive

_DATA = "data/gpus"


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One GPU. ``memory_gib`` as the driver reports it (NVIDIA's "80GB" is 80 GiB);
    ``interconnect_gb_s`` is the GPU-to-GPU bandwidth NVIDIA quotes (both directions
    together for NVLink; PCIe where there is no NVLink)."""

    name: str
    bf16_dense_tflops: float
    memory_gib: float
    memory_bandwidth_gb_s: float
    interconnect_gb_s: float
    interconnect: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("bf16_dense_tflops", "memory_gib", "memory_bandwidth_gb_s", "interconnect_gb_s"):
            check_positive(f, getattr(self, f))

    @property
    def peak_flops(self) -> float:
        return self.bf16_dense_tflops * 1e12

    @property
    def memory_bandwidth_bytes_s(self) -> float:
        return self.memory_bandwidth_gb_s * 1e9

    @property
    def link_bytes_s_per_direction(self) -> float:
        return self.interconnect_gb_s * 1e9 / 2.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPUSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPU-spec keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def available_gpus() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cpsim").joinpath(_DATA).iterdir()
                  if p.name.endswith(".json"))


@cache
def load_gpu_spec(name: str) -> GPUSpec:
    """A spec by name, any case (``A100-80GB``, ``h100-sxm``), or from a JSON path."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return GPUSpec.from_dict(json.loads(path.read_text()))
    entry = resources.files("cpsim").joinpath(f"{_DATA}/{name.strip().lower()}.json")
    if not entry.is_file():
        raise ValueError(f"unknown GPU {name!r}; allowed: {', '.join(available_gpus())}")
    return GPUSpec.from_dict(json.loads(entry.read_text()))
