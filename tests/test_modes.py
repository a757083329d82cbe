"""The mode policy of elastic workers on synthetic traces of demand (busy ranks of prefill and of
decode work): it flips when the work mix shifts, not on a noisy steady mix, never within the
dwell time, and never back and forth."""

from __future__ import annotations

import math
import random

import pytest

from pd_local.cluster.modes import CONFIRM_S, DWELL_S, Mode, ModePolicy, Rate


def policy(n: int) -> ModePolicy:
    return ModePolicy({r: Mode.MIXED for r in range(1, n + 1)})


def run(p: ModePolicy, demand: list[tuple[float, float]], dt: float = 0.5,
        running: dict[int, int] | None = None) -> list[tuple[float, int, Mode]]:
    """One decision every dt seconds; every flip as (time, rank, mode)."""
    out = []
    for i, (prefill, decode) in enumerate(demand):
        out += [(i * dt, f.rank, f.to) for f in p.decide(i * dt, prefill, decode, running or {})]
    return out


def noisy(rng: random.Random, prefill: float, decode: float, spread: float, n: int) -> list[tuple[float, float]]:
    return [(prefill * rng.uniform(1 - spread, 1 + spread), decode * rng.uniform(1 - spread, 1 + spread))
            for _ in range(n)]


def test_prefill_heavy_or_decode_heavy_steady_demand_keeps_every_rank_mixed() -> None:
    """Prefill-heavy: one rank could not carry it (it needs both); decode-heavy: prefill is too
    small a share to give it a rank."""
    rng = random.Random(0)
    for prefill, decode in ((1.0, 0.12), (0.08, 0.5), (0.6, 0.05)):
        p = policy(2)
        assert run(p, noisy(rng, prefill, decode, 0.15, 400)) == []
        assert set(p.modes.values()) == {Mode.MIXED}


def test_a_balanced_mix_splits_once_and_stays_split_through_noise() -> None:
    p = policy(2)
    flips = run(p, noisy(random.Random(1), 0.4, 0.35, 0.25, 400), running={1: 3, 2: 0})
    assert flips == [(CONFIRM_S, 1, Mode.DECODE), (CONFIRM_S, 2, Mode.PREFILL)]  # the idle rank prefills
    assert p.split() == 1


def test_a_shifting_mix_flips_at_each_phase_and_respects_the_dwell() -> None:
    rng = random.Random(2)
    demand = noisy(rng, 1.0, 0.12, 0.1, 60) + noisy(rng, 0.4, 0.3, 0.1, 60) + noisy(rng, 0.05, 0.5, 0.1, 60)
    flips = run(policy(2), demand)
    times = sorted({t for t, _, _ in flips})
    assert times == [30.0 + CONFIRM_S, 60.0 + CONFIRM_S], flips  # each confirmed, early in its phase
    assert [m for t, _, m in flips if t == 60.0 + CONFIRM_S] == [Mode.MIXED, Mode.MIXED]


def test_demand_hovering_at_a_boundary_flips_at_most_once() -> None:
    """A split starts at a prefill share of 0.25 and ends below 0.15; between, nothing flips."""
    hover = [(0.135 + 0.035 * math.sin(i / 3), 0.4) for i in range(600)]  # share 0.20 .. 0.30
    flips = run(policy(2), hover)
    assert len({t for t, _, _ in flips}) == 1, flips  # in once, never out
    quiet = [(0.1 + 0.024 * math.sin(i / 3), 0.4) for i in range(600)]  # share 0.16 .. 0.24
    assert run(policy(2), quiet) == []
    # the prefill side's load: in at 0.7 of a rank, out only past 0.9
    load = [(0.65 + 0.2 * max(0.0, math.sin(i / 3)), 0.3) for i in range(600)]  # 0.65 .. 0.85
    assert len({t for t, _, _ in run(policy(2), load)}) == 1


def test_dwell_blocks_a_flip_right_after_another() -> None:
    p = policy(2)
    assert run(p, [(0.4, 0.4)] * 9) != []  # split at t = CONFIRM_S
    t = CONFIRM_S
    assert p.decide(t + 1, 0.0, 0.8, {}) == []  # all decode now: wanted since t + 1
    assert p.decide(t + DWELL_S - 0.1, 0.0, 0.8, {}) == []  # confirmed, but too soon after the flip
    assert [f.to for f in p.decide(t + DWELL_S, 0.0, 0.8, {})] == [Mode.MIXED, Mode.MIXED]
    assert all("demand 0.00 prefill + 0.80 decode" in h[3] for h in p.history[-2:])  # each with its reason


def test_the_confirm_and_dwell_times_are_the_policys_own() -> None:
    """config [modes] sets them: a split confirmed after 1 s, and back 2 s after it."""
    p = ModePolicy({1: Mode.MIXED, 2: Mode.MIXED}, dwell_s=2.0, confirm_s=1.0)
    assert run(p, [(0.4, 0.4)] * 2) == [] and [f.to for f in p.decide(1.0, 0.4, 0.4, {})] != []
    assert p.decide(2.0, 0.0, 0.8, {}) == [] and p.decide(2.9, 0.0, 0.8, {}) == []  # dwell: until 3
    assert [f.to for f in p.decide(3.0, 0.0, 0.8, {})] == [Mode.MIXED, Mode.MIXED]
    fast = Rate(tau_s=0.5)
    for i in range(20):
        fast.add(i * 0.1, 50)
    assert fast.at(1.9 + 0.5) == pytest.approx(fast.at(1.9) / math.e, rel=0.02)


def test_a_mix_passing_through_on_the_way_to_another_phase_flips_nothing() -> None:
    """Prefill-heavy -> decode-heavy: the averages look balanced for a moment between."""
    demand = [(1.0, 0.12)] * 20 + [(0.3, 0.25)] * 7 + [(0.05, 0.6)] * 40  # 3.5 s of a mix
    assert run(policy(2), demand) == []


@pytest.mark.parametrize("prefill, decode, prefill_ranks", [
    (1.2, 0.8, 2), (0.5, 1.5, 1), (1.8, 0.65, 3), (2.5, 0.6, 0), (0.1, 2.0, 0), (1.2, 2.0, 0)])
def test_four_ranks_split_as_each_side_needs(prefill: float, decode: float, prefill_ranks: int) -> None:
    p = policy(4)
    p.decide(0.0, prefill, decode, {1: 4, 2: 1, 3: 0, 4: 2})
    assert p.split() == 0  # wanted, not yet confirmed
    p.decide(CONFIRM_S, prefill, decode, {1: 4, 2: 1, 3: 0, 4: 2})
    assert p.split() == prefill_ranks
    if prefill_ranks:
        assert set(p.modes.values()) == {Mode.PREFILL, Mode.DECODE}
        by_batch = [3, 2, 4, 1]  # the ranks with the fewest running decodes prefill
        assert {r for r, m in p.modes.items() if m is Mode.PREFILL} == set(by_batch[:prefill_ranks])


def test_rates() -> None:
    r = Rate()
    for i in range(200):
        r.add(i * 0.1, 50)  # 500 tokens/s
    assert r.at(19.9) == pytest.approx(500, rel=0.05)
    assert r.at(19.9 + 5) == pytest.approx(r.at(19.9) / math.e, rel=0.02)  # decays with no events
    early = Rate()
    for i in range(10):
        early.add(i * 0.1, 50)
    assert early.at(0.9) == pytest.approx(500, rel=0.15) and early.age(0.9) == 0.9  # not 1/5 of it


def test_the_operator_pins_modes_and_the_policy_waits_until_auto() -> None:
    """POST /v1/cluster/mode's core: a pinned mode holds through a mix that would flip it; a pin
    that leaves no rank to decode is refused, naming the rank; auto hands back to the policy,
    which first waits out the dwell."""
    p = policy(2)
    f = p.pin(0.0, 2, Mode.PREFILL)
    assert f is not None and (f.rank, f.to) == (2, Mode.PREFILL) and p.pinned
    assert run(p, noisy(random.Random(3), 1.0, 0.12, 0.1, 60)) == []  # would keep all mixed
    assert p.modes == {1: Mode.MIXED, 2: Mode.PREFILL}
    p.pin(0.5, 2, None)
    with pytest.raises(ValueError, match="rank 1 is the last rank that decodes"):
        p.pin(1.0, 1, Mode.PREFILL)
    assert not p.pinned and p.last_flip == 0.5  # a refused pin changes nothing
    p.pin(1.0, 2, Mode.PREFILL)
    with pytest.raises(ValueError, match=r"rank 7 is not an elastic worker \(those are \[1, 2\]\)"):
        p.check(7, Mode.MIXED)
    assert p.pin(1.0, 2, Mode.PREFILL) is None  # already so: no flip
    assert p.pin(40.0, 1, None) is None and not p.pinned
    flips = [(t, f.rank, f.to) for t in range(40, 60) for f in p.decide(float(t), 1.0, 0.12, {})]
    assert flips == [(40 + max(DWELL_S, CONFIRM_S), 2, Mode.MIXED)]  # prefill-heavy: all mixed again
