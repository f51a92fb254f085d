"""An honest ETA from a job's progress reports.

Elapsed time since the job started, divided by steps done, counts the start-up (imports, data,
model build, compilation, the first slow step) as if every step cost that much: the chaos run saw
455 s shown for an ablation that took 20 s. Here the clock starts at the first progress report,
no ETA is given until `min_steps` steps and `min_seconds` have been seen after it, and the rate is
that of a recent window, so a change of pace (a bigger arm, an eval phase) shows within it.
"""

from __future__ import annotations

from collections import deque


class EtaEstimator:
    def __init__(self, min_steps: int = 3, min_seconds: float = 3.0, window_seconds: float = 30.0):
        self.min_steps, self.min_seconds, self.window = min_steps, min_seconds, window_seconds
        self.samples: deque[tuple[float, int]] = deque()
        self.first: tuple[float, int] | None = None

    def update(self, t: float, step: int, total: int) -> float | None:
        """Record `step` of `total` reached at monotonic time `t`; the seconds left, or None
        while there is too little to go on (or no progress within the window)."""
        if step >= total:
            return 0.0
        if self.first is None or step < self.samples[-1][1]:
            # The first report, or the count went back (a kind restarting its count): start over.
            self.samples.clear()
            self.first = (t, step)
        self.samples.append((t, step))
        # Keep one sample at least a window old, so the rate spans the whole window.
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window:
            self.samples.popleft()
        t0, s0 = self.first
        if step - s0 < self.min_steps or t - t0 < self.min_seconds:
            return None
        old_t, old_step = self.samples[0]
        if step <= old_step or t <= old_t:
            return None  # no progress within the window: a stall, not a rate
        rate = (step - old_step) / (t - old_t)
        return (total - step) / rate
