"""A circuit breaker per KV path: stop handing requests over a link that keeps failing."""

from __future__ import annotations

from dataclasses import dataclass

from cpsim.validation import check_positive


@dataclass
class _Path:
    failures: int = 0  # in a row
    cut_until_s: float = -1.0  # cut (open) until then; half-open after, until a result
    trips: int = 0  # cuts in a row without a good hand-off between them
    probing: bool = False  # a half-open path's probe is under way (until a result)


class LinkBreaker:
    """After ``consecutive_failures`` hand-offs over a path (prefill instance -> decode
    instance) fail on the link in a row, the path is cut for ``cut_s`` x 2^(k-1) seconds
    (the k-th cut in a row, at most ``max_cut_s``). Then one hand-off at a time probes it:
    its KV arriving closes the path (and resets the back-off); its failure cuts it again.
    Meanwhile the core decodes requests where they were prefilled, or runs them whole, so a
    partition between the PD pools costs the transfers' speed-up, not the requests."""

    name = "link_breaker"

    def __init__(
        self, consecutive_failures: int = 2, cut_s: float = 5.0, max_cut_s: float = 60.0
    ) -> None:
        check_positive("consecutive_failures", consecutive_failures, integer=True)
        check_positive("cut_s", cut_s)
        check_positive("max_cut_s", max_cut_s)
        if max_cut_s < cut_s:
            raise ValueError(
                f"max_cut_s={max_cut_s!r} is not allowed; it must be at least cut_s={cut_s!r}"
            )
        self.consecutive_failures = consecutive_failures
        self.cut_s = cut_s
        self.max_cut_s = max_cut_s
        self._paths: dict[tuple[str, str], _Path] = {}

    def allows(self, source: str, target: str, now: float) -> bool:
        path = self._paths.get((source, target))
        if path is None or path.trips == 0:
            return True
        return now >= path.cut_until_s

    def trusted(self, source: str, target: str) -> bool:
        """Not cut since its last good hand-off (allowed, and not as a probe)."""
        path = self._paths.get((source, target))
        return path is None or path.trips == 0

    def on_handoff(self, source: str, target: str, now: float) -> None:
        path = self._paths.get((source, target))
        if path is not None and path.trips and now >= path.cut_until_s:
            # the probe: no other hand-off over the path until it ends, or for cut_s if
            # its end is never heard of (its decode instance died with it)
            path.probing = True
            path.cut_until_s = now + self.cut_s

    def on_result(self, source: str, target: str, ok: bool, now: float) -> None:
        key = (source, target)
        if ok:
            self._paths.pop(key, None)
            return
        path = self._paths.setdefault(key, _Path())
        path.failures += 1
        if path.probing or path.failures >= self.consecutive_failures:
            path.trips += 1
            path.failures = 0
            path.probing = False
            path.cut_until_s = now + min(self.cut_s * 2.0 ** (path.trips - 1), self.max_cut_s)

    def cut_paths(self, now: float) -> list[tuple[str, str, float]]:
        """The paths cut now, each with the seconds until it may be probed."""
        return [
            (source, target, path.cut_until_s - now)
            for (source, target), path in self._paths.items()
            if path.trips and path.cut_until_s > now and not path.probing
        ]
