"""A rank's step time, base + per decode row + per prompt token, fitted online from its own steps,
and the prompt-token budget that keeps a step within a TPOT target. Pure Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    """ms of one step = base_ms + row_ms * decode rows + token_ms * prompt tokens; all 0: unknown."""

    base_ms: float = 0.0
    row_ms: float = 0.0
    token_ms: float = 0.0

    @property
    def known(self) -> bool:
        return self.token_ms > 0

    def step_ms(self, rows: int, tokens: int) -> float:
        return self.base_ms + self.row_ms * rows + self.token_ms * tokens

    def prefill_budget(self, rows: int, tpot_ms: float, floor: int, cap: int, queued: int = 0,
                       ttft_ms: float = math.inf, recent_ms: float = math.inf) -> int:
        """Prompt tokens a step beside `rows` decode rows may take within tpot_ms, or more where
        that would not end the `queued` prompt tokens within ttft_ms; in [floor, cap]. The cap
        while the rows' recent mean step (`recent_ms`) is within tpot_ms: TPOT is a mean."""
        if rows == 0 or not self.known or recent_ms <= tpot_ms:  # tpot_ms inf (no budget): always
            return cap
        tpot = int((tpot_ms - self.step_ms(rows, 0)) / self.token_ms)
        left = ttft_ms - self.token_ms * queued  # for the steps' fixed part
        ttft = math.ceil(queued * self.step_ms(rows, 0) / left) if left > 0 else cap
        return max(floor, min(cap, max(tpot, ttft)))

    def prefill_ms(self, tokens: int, rows: int, budget: int) -> float:
        """Time to prefill `tokens` at `budget` a step beside `rows` decode rows."""
        full, rest = divmod(tokens, budget)
        return full * self.step_ms(rows, budget) + (self.step_ms(rows, rest) if rest else 0.0)


class CostFit:
    """Least squares of step ms on (1, rows, tokens), decayed per step, ridge toward 0."""

    def __init__(self, decay: float = 0.98, ridge: float = 1e-3) -> None:
        self.decay, self.ridge = decay, ridge
        self._a = [[0.0] * 3 for _ in range(3)]
        self._b = [0.0] * 3
        self.steps = 0
        self.busy = (0.0, 0.0)  # ms spent on prompt tokens, on decode rows, since start

    def add(self, rows: int, tokens: int, ms: float) -> None:
        """One step's time; a mixed step's decode part is what its rows alone would cost."""
        cost = self.cost()
        decode = ms if not tokens else min(ms, cost.step_ms(rows, 0)) if rows and cost.known else 0.0
        self.busy = (self.busy[0] + ms - decode, self.busy[1] + decode)
        x = (1.0, float(rows), float(tokens))
        for i in range(3):
            self._b[i] = self.decay * self._b[i] + x[i] * ms
            for j in range(3):
                self._a[i][j] = self.decay * self._a[i][j] + x[i] * x[j]
        self.steps += 1

    def cost(self) -> StepCost:
        """The fit; unknown (all 0) until a step with prompt tokens was seen."""
        if self._a[2][2] == 0:
            return StepCost()
        a = [[self._a[i][j] + (self.ridge if i == j else 0.0) for j in range(3)] for i in range(3)]
        base, row, token = _solve3(a, list(self._b))
        return StepCost(max(base, 0.0), max(row, 0.0), max(token, 1e-6))


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float]:
    """a x = b for a symmetric positive definite 3x3 a (Gaussian elimination, partial pivoting)."""
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(3):
        p = max(range(c, 3), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, 3):
            f = m[r][c] / m[c][c]
            m[r] = [m[r][k] - f * m[c][k] for k in range(4)]
    x = [0.0] * 3
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][k] * x[k] for k in range(r + 1, 3))) / m[r][r]
    return x[0], x[1], x[2]
