"""The loss-spike guard (``train.spike.*``): a step whose loss is far above the recent ones is a spike.

Detection, on the global-batch loss of each step (before its update is applied):

- ``method=zscore``: ``(loss - mean) / std`` over the last ``window`` accepted losses above ``threshold``;
- ``method=ema``: ``loss / EMA(loss)`` (``ema_beta``) above ``threshold``.

Nothing is judged during the first ``warmup`` steps (the loss falls fast there and the statistics are not yet
meaningful). A spike's update is skipped and its loss kept out of the statistics. ``repeat`` spikes within
``repeat_window`` steps mean the data (or the weights) went bad: the trainer rolls back to the last checkpoint and
skips the global sample range from the first of those spikes to the last, recorded in the checkpoint and in
metrics.jsonl; after ``max_rollbacks`` rollbacks the run stops with exit 3.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

OK, SKIP, ROLLBACK = "ok", "skip", "rollback"
METHODS = ("zscore", "ema")


@dataclass
class SpikeConfig:
    """``train.spike.*``"""

    enabled: bool = False
    method: str = "zscore"  # zscore | ema
    threshold: float = 6.0  # zscore: standard deviations above the window's mean; ema: ratio to the EMA
    window: int = 100  # accepted losses the z-score is computed over
    ema_beta: float = 0.98
    warmup: int = 50  # steps before the guard judges (and the minimum history)
    repeat: int = 3  # this many spikes ...
    repeat_window: int = 20  # ... within this many steps: roll back
    max_rollbacks: int = 2  # one more repeated spike after this many rollbacks stops the run (exit 3)


def validate_spike(s) -> str | None:
    """The first bad ``train.spike.*`` value as one line, else None."""
    if s.method not in METHODS:
        return f"train.spike.method={s.method!r} is not one of {', '.join(METHODS)}"
    if not s.threshold > (0 if s.method == "zscore" else 1):
        return f"train.spike.threshold={s.threshold} must be > {0 if s.method == 'zscore' else 1} for method={s.method}"
    for key, low in (("window", 2), ("warmup", 0), ("repeat", 1), ("repeat_window", 1), ("max_rollbacks", 0)):
        if s[key] < low:
            return f"train.spike.{key}={s[key]} must be >= {low}"
    if not 0 < s.ema_beta < 1:
        return f"train.spike.ema_beta={s.ema_beta} must be in (0, 1)"
    return None


class SpikeGuard:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=int(cfg.window))
        self.ema: float | None = None
        self.seen = 0  # steps judged or learnt from
        self.spikes: deque[int] = deque()  # steps of recent spikes

    def score(self, loss: float) -> float:
        """How far ``loss`` is above normal (z-score, or ratio to the EMA); 0 while there is no reference."""
        if self.cfg.method == "ema":
            return loss / self.ema if self.ema else 0.0
        if len(self.history) < 2:
            return 0.0
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / (len(self.history) - 1))
        return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-8)

    def check(self, step: int, loss: float) -> tuple[str, float]:
        """The verdict for ``step``'s global loss: OK (learn from it), SKIP, or ROLLBACK; and the score."""
        if not math.isfinite(loss):
            return OK, float("nan")  # non-finite losses are the NaN guard's (train.max_nan_skips)
        score = self.score(loss)
        self.seen += 1
        if self.seen > self.cfg.warmup and score > self.cfg.threshold:
            self.spikes.append(step)
            while self.spikes and self.spikes[0] <= step - self.cfg.repeat_window:
                self.spikes.popleft()
            return (ROLLBACK if len(self.spikes) >= self.cfg.repeat else SKIP), score
        self.history.append(loss)
        beta = self.cfg.ema_beta
        self.ema = loss if self.ema is None else beta * self.ema + (1 - beta) * loss
        return OK, score

    def first_recent_spike(self) -> int:
        return self.spikes[0]

    def clear_spikes(self) -> None:
        self.spikes.clear()

    def state_dict(self) -> dict:
        return {"history": list(self.history), "ema": self.ema, "seen": self.seen, "spikes": list(self.spikes)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=int(self.cfg.window))
        self.ema, self.seen, self.spikes = state["ema"], int(state["seen"]), deque(state["spikes"])
