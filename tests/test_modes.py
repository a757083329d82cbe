"""The mode policy of elastic workers on synthetic traces: it flips when the work mix shifts, not
on a noisy steady mix, never within the dwell time, and never back and forth."""

from __future__ import annotations

import math
import random

import pytest

from pd_local.cluster.modes import DWELL_S, HYSTERESIS, Mode, ModePolicy, Rate, prefill_share


def policy(n: int) -> ModePolicy:
    return ModePolicy({r: Mode.MIXED for r in range(1, n + 1)})


def run(p: ModePolicy, shares: list[float], dt: float = 0.5, running: dict[int, int] | None = None
        ) -> list[tuple[float, int, Mode]]:
    """One decision every dt seconds; every flip as (time, rank, mode)."""
    out = []
    for i, share in enumerate(shares):
        out += [(i * dt, f.rank, f.to) for f in p.decide(i * dt, share, running or {})]
    return out


def noisy(rng: random.Random, mean: float, spread: float, n: int) -> list[float]:
    return [min(1.0, max(0.0, mean + rng.uniform(-spread, spread))) for _ in range(n)]


def test_a_prefill_heavy_or_decode_heavy_steady_mix_keeps_every_rank_mixed() -> None:
    rng = random.Random(0)
    for mean in (0.92, 0.08):
        p = policy(2)
        assert run(p, noisy(rng, mean, 0.05, 400)) == []
        assert set(p.modes.values()) == {Mode.MIXED}


def test_a_balanced_mix_splits_once_and_stays_split_through_noise() -> None:
    p = policy(2)
    flips = run(p, noisy(random.Random(1), 0.5, 0.12, 400), running={1: 3, 2: 0})
    assert flips == [(0.0, 1, Mode.DECODE), (0.0, 2, Mode.PREFILL)]  # the idle rank prefills
    assert p.split() == 1


def test_a_shifting_mix_flips_at_each_phase_and_respects_the_dwell() -> None:
    rng = random.Random(2)
    shares = noisy(rng, 0.9, 0.05, 60) + noisy(rng, 0.5, 0.05, 60) + noisy(rng, 0.1, 0.05, 60)
    flips = run(policy(2), shares)
    times = sorted({t for t, _, _ in flips})
    assert len(times) == 2 and 30 <= times[0] < 30 + DWELL_S and 60 <= times[1] < 60 + DWELL_S, flips
    assert [m for t, _, m in flips if t == times[1]] == [Mode.MIXED, Mode.MIXED]


def test_a_share_hovering_at_a_boundary_flips_at_most_once() -> None:
    """n = 2: split when share x 2 reaches 0.5 + HYSTERESIS, back only below 0.5 - HYSTERESIS."""
    shares = [0.35 + 0.04 * math.sin(i / 3) for i in range(600)]  # x 2 = 0.62 .. 0.78
    assert min(shares) * 2 > 0.5 - HYSTERESIS and max(shares) * 2 > 0.5 + HYSTERESIS
    flips = run(policy(2), shares)
    assert len({t for t, _, _ in flips}) == 1, flips  # in once, never out
    quiet = [0.25 + 0.09 * math.sin(i / 3) for i in range(600)]  # x 2 = 0.32 .. 0.68: inside the band
    assert run(policy(2), quiet) == []


def test_dwell_blocks_a_flip_right_after_another() -> None:
    p = policy(2)
    assert run(p, [0.5]) != []  # split at t = 0
    assert p.decide(DWELL_S - 0.1, 0.0, {}) == []  # all decode now, but too soon
    assert [f.to for f in p.decide(DWELL_S, 0.0, {})] == [Mode.MIXED, Mode.MIXED]
    assert all("prefill share 0.00" in h[3] for h in p.history[-2:])  # each flip has its reason


@pytest.mark.parametrize("share, prefill_ranks", [(0.5, 2), (0.3, 1), (0.7, 3), (0.05, 0), (0.97, 0)])
def test_four_ranks_split_in_proportion_to_the_mix(share: float, prefill_ranks: int) -> None:
    p = policy(4)
    p.decide(0.0, share, {1: 4, 2: 1, 3: 0, 4: 2})
    assert p.split() == prefill_ranks
    if prefill_ranks:
        assert set(p.modes.values()) == {Mode.PREFILL, Mode.DECODE}
        by_batch = [3, 2, 4, 1]  # the ranks with the fewest running decodes prefill
        assert {r for r, m in p.modes.items() if m is Mode.PREFILL} == set(by_batch[:prefill_ranks])


def test_rates_and_the_prefill_share() -> None:
    r = Rate()
    for i in range(200):
        r.add(i * 0.1, 50)  # 500 tokens/s
    assert r.at(19.9) == pytest.approx(500, rel=0.05)
    assert r.at(19.9 + 5) == pytest.approx(r.at(19.9) / math.e)  # decays with no events
    assert prefill_share(1000, 20, token_ms=0.2, decode_token_ms=10) == pytest.approx(200 / 400)
    assert prefill_share(0, 0, 0.2, 10) == 0.5
