"""GPU specifications (peak bf16 FLOP/s, memory, bandwidths), loaded from data files."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from cpsim.datafiles import data_names, from_known_keys, read_data
from cpsim.validation import check_positive


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
        return from_known_keys(cls, data, "GPU-spec")


def available_gpus() -> list[str]:
    return data_names("gpus")


@cache
def load_gpu_spec(name: str) -> GPUSpec:
    """A spec by name, any case (``A100-80GB``, ``h100-sxm``), or from a JSON path."""
    key = name if name.endswith(".json") else name.strip().lower()
    return GPUSpec.from_dict(read_data("gpus", key, "GPU"))
