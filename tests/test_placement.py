"""Elastic placement as pure code: the step-cost fit, the TPOT prefill budget, and place() on
snapshots of ranks (fixed topologies included: they are placements with fewer choices)."""

from __future__ import annotations

import math
import random

import pytest

from pd_local.cluster.placement import LOCAL_MARGIN, PREFIX_DECODE_MARGIN, Placer, RankView, Slo, place
from pd_local.engine.step_cost import CostFit, StepCost

SLO = Slo(ttft_ms=2000, tpot_ms=100)
COST = StepCost(base_ms=10, row_ms=2, token_ms=0.2)  # 256 prompt tokens alone: 61 ms


def view(rank: int, queued: int = 0, running: int = 0, free: int = 100, cost: StepCost = COST,
         own: bool = True, others: bool = True, decodes: bool = True, matched: int = 0) -> RankView:
    return RankView(rank, decodes, own, others, queued, running, free, cost, matched=matched)


def placer(policy: str) -> Placer:
    return Placer(policy, SLO, 16, 512)


ELASTIC = [view(1), view(2)]
COLOCATED = [view(1, others=False), view(2, others=False)]
PD_1P2D = [view(1, own=False, decodes=False), view(2, own=False, others=False), view(3, own=False, others=False)]
PD_2P1D = [view(1, own=False, decodes=False), view(2, own=False, decodes=False), view(3, own=False, others=False)]


def test_the_fit_recovers_a_step_cost_from_noisy_mixed_steps() -> None:
    rng, fit = random.Random(0), CostFit()
    assert fit.cost() == StepCost() and not fit.cost().known  # nothing seen
    for _ in range(400):
        rows, tokens = rng.randint(0, 16), rng.choice([0, 0, 16, 64, 256])
        fit.add(rows, tokens, COST.step_ms(rows, tokens) * rng.uniform(0.95, 1.05))
    got = fit.cost()
    assert got.base_ms == pytest.approx(10, rel=0.15)
    assert got.row_ms == pytest.approx(2, rel=0.1) and got.token_ms == pytest.approx(0.2, rel=0.05)


def test_the_fit_follows_a_rank_whose_steps_got_slower() -> None:
    fit = CostFit()
    for i in range(600):
        cost = COST if i < 300 else StepCost(20, 4, 0.4)  # e.g. another process took a core
        fit.add(i % 8, (i % 3) * 64, cost.step_ms(i % 8, (i % 3) * 64))
    assert fit.cost().token_ms == pytest.approx(0.4, rel=0.05)


def test_decode_only_steps_give_no_prefill_cost_yet() -> None:
    fit = CostFit()
    for _ in range(50):
        fit.add(4, 0, 18.0)
    assert not fit.cost().known


def test_prefill_time_counts_full_steps_at_the_budget_and_the_rest() -> None:
    assert COST.prefill_ms(300, 0, 512) == COST.step_ms(0, 300)
    assert COST.prefill_ms(1100, 4, 512) == 2 * COST.step_ms(4, 512) + COST.step_ms(4, 76)
    assert COST.prefill_ms(0, 4, 512) == 0


def test_the_prefill_budget_shrinks_as_the_decode_batch_grows() -> None:
    budgets = [COST.prefill_budget(rows, 100, floor=16, cap=512) for rows in (0, 1, 8, 20, 40, 45)]
    assert budgets[0] == 512  # no decode rows: nothing to protect
    assert budgets[1] == int((100 - 12) / 0.2) == 440
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 16  # never below the floor
    for rows, b in zip((1, 8, 20), budgets[1:4]):
        assert COST.step_ms(rows, b) <= 100 < COST.step_ms(rows, b + 1)
    assert StepCost().prefill_budget(30, 100, 16, 512) == 512  # unknown cost: the configured cap
    assert COST.prefill_budget(45, math.inf, 16, 512, recent_ms=900) == 512  # slo.tpot_budget off


def test_the_tpot_share_applies_only_while_the_rows_recent_mean_step_is_over_target() -> None:
    """TPOT is a mean: while the decode rows' recent steps average within it, a step may take
    the configured cap (one long step among short ones); past it, the TPOT share."""
    assert COST.prefill_budget(20, 100, 16, 512, recent_ms=60) == 512
    assert COST.prefill_budget(20, 100, 16, 512, recent_ms=100) == 512
    assert COST.prefill_budget(20, 100, 16, 512, recent_ms=130) == 250


def test_a_queue_that_threatens_ttft_takes_more_than_the_tpot_budget() -> None:
    tpot_only = COST.prefill_budget(20, 100, 16, 512)  # (100 - 50) / 0.2 = 250
    assert tpot_only == 250
    assert COST.prefill_budget(20, 100, 16, 512, queued=2000, ttft_ms=2000) == 250  # 8 steps: 1.2 s
    grown = COST.prefill_budget(20, 100, 16, 512, queued=6000, ttft_ms=2000)
    assert tpot_only < grown < 512
    assert COST.prefill_ms(6000, 20, grown) <= 2000 < COST.prefill_ms(6000, 20, grown - 1)
    assert COST.prefill_budget(20, 100, 16, 512, queued=20000, ttft_ms=2000) == 512  # out of reach: all it can


def test_idle_ranks_prefill_where_they_decode() -> None:
    p = place(300, 20, [view(1), view(2)], SLO, 16, 512)
    assert (p.prefill, p.decode) == (1, 1) and p.reason.startswith("local")


def test_a_long_queue_on_the_decode_rank_sends_the_prompt_to_a_free_rank() -> None:
    ranks = [view(1, queued=4000), view(2, queued=4000, running=3), view(3)]
    p = place(300, 20, ranks, SLO, 16, 512)
    assert p.decode == 1  # the smallest decode batch, then the shortest step
    assert p.prefill == 3 and "rank 3 prefills" in p.reason and p.ttft_ms > 0


def test_a_rank_only_slightly_earlier_does_not_take_the_prompt() -> None:
    # local: queue 20 + 300 tokens in one step; the other: 300 in one step, a little faster
    mine, other = view(1, queued=20), view(2, running=1, cost=StepCost(8, 2, 0.19))
    est_local = mine.cost.step_ms(0, 320)
    est_other = other.cost.step_ms(1, 300)
    assert LOCAL_MARGIN * est_local < est_other < est_local
    assert place(300, 20, [mine, other], SLO, 16, 512).prefill == 1


def test_a_big_decode_batch_pushes_prefill_to_a_rank_with_room_in_its_steps() -> None:
    """Equal queues, but rank 1 decodes 40 sequences: TPOT leaves it 50 tokens a step, so the
    prompt would take many steps there; rank 2 (no decode batch, but no room for the KV) prefills."""
    busy, full = view(1, running=40, queued=0), view(2, running=0, free=3)
    p = place(600, 40, [busy, full], SLO, 16, 512)
    assert (p.prefill, p.decode) == (2, 1), p


def test_decode_goes_to_the_smallest_batch_even_where_prefill_made_steps_look_slow() -> None:
    """A rank that prefilled a lot fits a higher step cost; decode still balances by batch, or
    one rank would take every decode and leave prefill to the other alone."""
    prefiller = view(1, running=1, cost=StepCost(40, 8, 0.2))
    decoder = view(2, running=6, cost=StepCost(10, 2, 0.2))
    assert place(20, 2, [prefiller, decoder], SLO, 16, 512).decode == 1
    assert place(20, 2, [view(1, running=3, cost=StepCost(40, 8, 0.2)), view(2, running=3)], SLO, 16, 512).decode == 2


def test_the_decode_rank_must_have_room_for_the_prompt() -> None:
    ranks = [view(1, running=0, free=5), view(2, running=10, free=100)]
    assert place(300, 20, ranks, SLO, 16, 512).decode == 2
    # nowhere fits: still placed (the decode rank's admission queue waits for room)
    assert place(300, 500, ranks, SLO, 16, 512).decode == 1


def test_unknown_costs_fall_back_to_the_least_queued_prefill_work() -> None:
    unknown = StepCost()
    ranks = [view(1, queued=900, cost=unknown), view(2, queued=100, cost=unknown)]
    p = place(50, 4, ranks, SLO, 16, 512)
    assert (p.prefill, p.decode) == (2, 1) and p.ttft_ms == 0 and "unknown" in p.reason
    ranks = [view(1, queued=100, cost=unknown), view(2, queued=100, cost=unknown)]
    assert place(50, 4, ranks, SLO, 16, 512).prefill == 1  # a tie stays local


def test_fixed_topologies_are_placements_with_fewer_choices() -> None:
    colocated = [view(1, queued=5000, others=False), view(2, queued=5000, running=2, others=False)]
    assert place(300, 20, colocated, SLO, 16, 512).prefill == 1  # its own, however long
    pd = [view(1, own=False, decodes=False), view(2, own=False, decodes=False, queued=800),
          view(3, own=False, others=False)]
    p = place(300, 20, pd, SLO, 16, 512)
    assert (p.prefill, p.decode) == (1, 3)
    with pytest.raises(ValueError, match="no rank decodes"):
        place(300, 20, pd[:2], SLO, 16, 512)
    with pytest.raises(ValueError, match="no rank prefills for decode rank 3"):
        place(300, 20, pd[2:], SLO, 16, 512)


def test_mostly_decode_ranks_prefill_only_when_the_queue_threatens_ttft() -> None:
    prefiller = view(1, decodes=False)  # mostly-prefill: takes no decodes
    decoder = view(2, own=False, others=False)
    decoder = RankView(**{**decoder.__dict__, "helps": True})
    p = place(300, 20, [prefiller, decoder], SLO, 16, 512)
    assert (p.prefill, p.decode) == (1, 2)  # PD-like
    swamped = view(1, decodes=False, queued=20000)  # 4 s of prompts ahead: TTFT 2 s is out of reach
    p = place(300, 20, [swamped, decoder], SLO, 16, 512)
    assert (p.prefill, p.decode) == (2, 2) and p.reason.startswith("local")


def test_the_fit_splits_each_step_time_into_prefill_and_decode_work() -> None:
    fit = CostFit()
    fit.add(4, 0, 18.0)  # decode only
    fit.add(0, 256, 61.2)  # prefill only (the cost is unknown before it: all prefill)
    assert fit.busy == (61.2, 18.0)
    for i in range(300):
        rows, tokens = i % 9, (i % 4) * 64
        fit.add(rows, tokens, COST.step_ms(rows, tokens))
    before, cost = fit.busy, fit.cost()
    fit.add(8, 128, COST.step_ms(8, 128))  # mixed: its rows' part is what they alone would cost
    assert fit.busy[1] - before[1] == pytest.approx(cost.step_ms(8, 0))
    assert fit.busy[0] - before[0] == pytest.approx(COST.step_ms(8, 128) - cost.step_ms(8, 0))


@pytest.mark.parametrize("policy", ["load", "round_robin", "prefix"])
@pytest.mark.parametrize("ranks,allowed", [
    (COLOCATED, {(1, 1), (2, 2)}),
    (PD_1P2D, {(1, 2), (1, 3)}),
    (PD_2P1D, {(1, 3), (2, 3)}),
    (ELASTIC, {(1, 1), (1, 2), (2, 1), (2, 2)}),
], ids=["colocated-2", "1P2D", "2P1D", "elastic-2"])
def test_every_topology_and_policy_places_through_one_path_within_the_roles(
        policy: str, ranks: list[RankView], allowed: set[tuple[int, int]]) -> None:
    """(prefill, decode) pairs stay within what each rank's role allows, whatever the policy."""
    pl = placer(policy)
    got = {(p.prefill, p.decode) for p in (pl.place(100, 7, ranks) for _ in range(8))}
    assert got <= allowed, got


def test_round_robin_takes_decode_ranks_in_turn_and_each_ones_prefill_ranks_in_turn() -> None:
    pl = placer("round_robin")
    assert [(p.prefill, p.decode) for p in (pl.place(100, 7, ELASTIC) for _ in range(4))] == \
        [(1, 1), (1, 2), (2, 1), (2, 2)]  # every pair: local and both ways
    pl = placer("round_robin")
    assert [pl.place(100, 7, PD_2P1D).prefill for _ in range(4)] == [1, 2, 1, 2]
    pl = placer("round_robin")
    assert [pl.place(100, 7, PD_1P2D).decode for _ in range(4)] == [2, 3, 2, 3]
    # the set changes (a rank flipped to mostly-prefill): the turn goes on among those left
    pl = placer("round_robin")
    assert pl.place(100, 7, ELASTIC).decode == 1
    assert pl.place(100, 7, [view(1), view(2, decodes=False)]).decode == 1
    assert pl.place(100, 7, ELASTIC).decode == 2


def test_prefix_routing_prefers_the_rank_holding_the_prompt_within_a_margin() -> None:
    pl = placer("prefix")
    near = [view(2, own=False, others=False, running=3, matched=5), view(3, own=False, others=False)]
    p = pl.place(100, 7, [view(1, own=False, decodes=False), *near])
    assert (p.decode, p.decode_matched) == (2, 5)
    far = [view(2, own=False, others=False, running=PREFIX_DECODE_MARGIN + 1, matched=5),
           view(3, own=False, others=False)]
    assert pl.place(100, 7, [view(1, own=False, decodes=False), *far]).decode == 3
    # PD prefill: queued tokens plus the prompt tokens the rank lacks
    prefillers = [view(1, own=False, decodes=False, queued=50, matched=6),
                  view(2, own=False, decodes=False, queued=0), view(3, own=False, others=False)]
    p = pl.place(100, 7, prefillers)
    assert (p.prefill, p.prefill_matched) == (1, 6), p  # 50 + 100 - 96 < 0 + 100
    # elastic: local unless another rank has less prefill queued
    assert pl.place(100, 7, [view(1), view(2, running=1, queued=10)]).prefill == 1
    assert pl.place(100, 7, [view(1, queued=500), view(2, running=1)]).prefill == 2


def test_a_placer_refuses_an_unknown_policy_and_a_topology_with_no_decoder() -> None:
    with pytest.raises(ValueError, match="routing must be one of load, round_robin, prefix; got 'random'"):
        placer("random")
    for policy in ("round_robin", "prefix"):
        with pytest.raises(ValueError, match="no rank decodes"):
            placer(policy).place(100, 7, PD_2P1D[:2])
        with pytest.raises(ValueError, match="no rank prefills for decode rank 3"):
            placer(policy).place(100, 7, PD_2P1D[2:])
