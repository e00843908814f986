"""Back-off restarts: bring a dead engine back, later each time it keeps dying."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.validation import check_non_negative, check_positive


class BackoffRestart:
    """Kubernetes' CrashLoopBackOff for engines. At the k-th crash within the last
    ``window_s`` seconds (this one included), the engine is restarted after
    ``initial_delay_s`` x 2^(k-1) seconds, at most ``max_delay_s``; past ``max_restarts``
    crashes in the window it is left down for good (an engine that keeps dying wastes its
    GPU and the requests routed to it between crashes). An engine that stays up for
    ``window_s`` starts again from the initial delay. ``probation``: a restarted engine
    is trusted with one request at a time (``core.outliers.probe_concurrency``) until a few
    succeed, so one that crashes again takes little with it."""

    name = "backoff"

    def __init__(
        self,
        initial_delay_s: float = 10.0,
        max_delay_s: float = 300.0,
        max_restarts: int = 5,
        window_s: float = 600.0,
        probation: bool = True,
    ) -> None:
        check_non_negative("initial_delay_s", initial_delay_s)
        check_non_negative("max_delay_s", max_delay_s)
        if max_delay_s < initial_delay_s:
            raise ValueError(
                f"max_delay_s={max_delay_s!r} is not allowed; it must be at least "
                f"initial_delay_s={initial_delay_s!r}"
            )
        check_positive("max_restarts", max_restarts, integer=True)
        check_positive("window_s", window_s)
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.probation = probation

    def restart_delay(self, crash_times: Sequence[float], now: float) -> float | None:
        recent = sum(1 for t in crash_times if now - t < self.window_s) or 1
        if recent > self.max_restarts:
            return None
        return min(self.initial_delay_s * 2.0 ** (recent - 1), self.max_delay_s)
