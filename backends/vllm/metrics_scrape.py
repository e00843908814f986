"""vLLM's /metrics page (Prometheus text format) into InstanceSnapshots."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpsim.views import InstanceSnapshot

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"  # a fraction in [0, 1] despite the name
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
CACHE_CONFIG = "vllm:cache_config_info"  # labels num_gpu_blocks and block_size

Sample = tuple[dict[str, str], float]


def _parse_labels(text: str) -> dict[str, str]:
    """``a="x",b="y \\" z"`` -> {"a": "x", "b": 'y " z'}."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.index("=", i)
        key = text[i:eq].strip().lstrip(",").strip()
        j = text.index('"', eq) + 1
        value: list[str] = []
        while text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
        while i < n and text[i] in ", ":
            i += 1
    return labels


def parse_prometheus_text(text: str) -> dict[str, list[Sample]]:
    """Samples by metric name: each a (labels, value) pair. Comments, blank lines and lines
    that do not parse are skipped; a trailing timestamp is ignored."""
    out: dict[str, list[Sample]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name, rest = line.split("{", 1)
                label_text, rest = rest.rsplit("}", 1)
                labels = _parse_labels(label_text)
            else:
                name, rest = line.split(None, 1)
                labels = {}
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        out.setdefault(name.strip(), []).append((labels, value))
    return out


def metric_sum(samples: dict[str, list[Sample]], name: str) -> float | None:
    """Sum of a metric over its label sets (engines of a data-parallel server), or None."""
    found = samples.get(name)
    if not found:
        return None
    return sum(v for _, v in found if not math.isnan(v))


def metric_mean(samples: dict[str, list[Sample]], name: str) -> float | None:
    found = samples.get(name)
    if not found:
        return None
    return sum(v for _, v in found) / len(found)


@dataclass
class MetricsScraper:
    """Turns successive /metrics pages of one instance into snapshots. The prefix-cache hit
    rate is over the tokens looked up since the previous page (the last rate when none).
    Health is left unset (None): the backend's health checks own it. It also keeps the last
    page's KV usage and the KV cache's size (``num_blocks`` of ``block_size`` tokens, from
    ``vllm:cache_config_info``; None where the engine does not export it)."""

    instance_id: str
    kv_usage_frac: float | None = None
    num_blocks: int | None = None
    block_size: int = 16
    _last_queries: float | None = None
    _last_hits: float | None = None
    _hit_rate: float | None = None

    def snapshot(self, text: str, now: float) -> InstanceSnapshot:
        samples = parse_prometheus_text(text)
        running = metric_sum(samples, RUNNING)
        waiting = metric_sum(samples, WAITING)
        kv = metric_mean(samples, KV_USAGE)
        self.kv_usage_frac = None if kv is None else min(1.0, max(0.0, kv))
        self._update_hit_rate(metric_sum(samples, PREFIX_QUERIES), metric_sum(samples, PREFIX_HITS))
        if self.num_blocks is None:
            self._read_cache_config(samples)
        return InstanceSnapshot(
            self.instance_id,
            now,
            num_running=None if running is None else int(running),
            num_waiting=None if waiting is None else int(waiting),
            kv_cache_usage_frac=self.kv_usage_frac,
            prefix_cache_hit_rate=self._hit_rate,
        )

    def _read_cache_config(self, samples: dict[str, list[Sample]]) -> None:
        for labels, _ in samples.get(CACHE_CONFIG, ()):
            blocks, size = labels.get("num_gpu_blocks", ""), labels.get("block_size", "")
            if blocks.isdigit() and int(blocks) > 0:
                self.num_blocks = int(blocks)
                if size.isdigit() and int(size) > 0:
                    self.block_size = int(size)

    def _update_hit_rate(self, queries: float | None, hits: float | None) -> None:
        if queries is None or hits is None:
            return
        last_q, last_h = self._last_queries, self._last_hits
        self._last_queries, self._last_hits = queries, hits
        if last_q is None or last_h is None or queries < last_q:  # first page or a restart
            if queries > 0:
                self._hit_rate = hits / queries
            return
        if queries > last_q:
            self._hit_rate = (hits - last_h) / (queries - last_q)
