"""CPU threads per rank: the plan on given affinity masks, and what a rank ends up running with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pd_local.engine.threads import (ThreadPlan, format_cpu_list, parse_cpu_list, physical_cores,
                                     plan_world)


def cores(n: int, smt: int = 1) -> list[tuple[int, ...]]:
    """n physical cores of `smt` logical CPUs each, numbered as Linux does (siblings n apart)."""
    return physical_cores(range(n * smt), lambda c: tuple(c % n + k * n for k in range(smt)))


def workers(plans: list[ThreadPlan]) -> list[tuple[int, str]]:
    return [(p.threads, format_cpu_list(p.cpus)) for p in plans[1:]]


def test_cpu_lists_round_trip() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpu_list((11, 0, 1, 2, 3, 8, 10)) == "0-3,8,10-11"
    assert format_cpu_list([5]) == "5"


def test_hyperthread_siblings_make_one_core() -> None:
    assert cores(4, smt=2) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # a mask holding one sibling of a pair keeps just that one
    assert physical_cores([0, 1, 4], lambda c: (c % 4, c % 4 + 4)) == [(0, 4), (1,)]


@pytest.mark.parametrize("n_cores, n_workers, want", [
    (2, 1, [(2, "0-1")]),  # 2 cores: this project's CI
    (2, 2, [(1, "0"), (1, "1")]),
    (2, 3, [(1, "0"), (1, "1"), (1, "0")]),  # fewer cores than workers: in turn
    (8, 1, [(8, "0-7")]),
    (8, 2, [(4, "0-3"), (4, "4-7")]),
    (8, 3, [(3, "0-2"), (3, "3-5"), (2, "6-7")]),  # the extra cores to the lowest ranks
])
def test_auto_gives_each_worker_its_share_of_the_cores(n_cores: int, n_workers: int,
                                                       want: list[tuple[int, str]]) -> None:
    plans = plan_world(cores(n_cores), n_workers)
    assert len(plans) == 1 + n_workers
    assert workers(plans) == want
    assert plans[0].threads == 1 and plans[0].cpus == ()  # rank 0 floats: it needs ~0.04 cores


def test_hyperthreads_count_once_and_travel_with_their_core() -> None:
    plans = plan_world(cores(8, smt=2), 2)  # a 16-thread laptop
    assert workers(plans) == [(4, "0-3,8-11"), (4, "4-7,12-15")]


@pytest.mark.parametrize("n_cores", range(1, 20))
@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_bound_workers_never_share_a_core_when_there_are_enough(n_cores: int, n_workers: int) -> None:
    plans = plan_world(cores(n_cores), n_workers)
    used = [c for p in plans if p.cpus for c in p.cpus]
    assert set(used) <= set(range(n_cores))
    if n_cores >= n_workers:
        assert len(used) == len(set(used)), plans  # disjoint
        assert sum(p.threads for p in plans[1:]) == n_cores
    assert all(p.threads >= 1 and p.threads == max(1, len(p.cpus)) for p in plans[1:])


def test_explicit_threads_bind_only_when_they_fit() -> None:
    assert workers(plan_world(cores(8), 2, threads=3)) == [(3, "0-2"), (3, "3-5")]
    loose = plan_world(cores(2), 2, threads=2)
    assert workers(loose) == [(2, ""), (2, "")]
    assert "not bound" in loose[1].why


def test_a_gpu_rank_keeps_a_small_count() -> None:
    plans = plan_world(cores(32), 4, device="cuda")
    assert [p.threads for p in plans[1:]] == [2, 2, 2, 2]
    assert workers(plans)[0] == (2, "0-7")


def test_a_world_needs_workers_and_cores() -> None:
    with pytest.raises(ValueError, match="1 worker"):
        plan_world(cores(2), 0)
    with pytest.raises(ValueError, match="1 core"):
        plan_world([], 1)


def test_apply_binds_and_sets_threads_and_reports_what_took_effect() -> None:
    code = ("from pd_local.engine.threads import ThreadPlan, apply, in_effect; "
            "print(apply(ThreadPlan(1, (0,))), in_effect())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, '0') (1, '0')"
