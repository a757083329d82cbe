"""CPU threads per rank: each worker of a world gets its share of the usable cores (the process's
affinity mask, grouped into physical cores), bound to them so ranks don't fight over cores.
`plan_world` is pure; `apply` binds the calling thread and sets torch's intra-op threads."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

GPU_THREADS = 2  # a GPU rank's host work is launches and bookkeeping, not math


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch intra-op threads
    cpus: tuple[int, ...] = ()  # logical CPUs to bind to; (): leave the mask as it is
    why: str = ""


def _siblings(cpu: int) -> tuple[int, ...]:
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return (cpu,)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    out: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def format_cpu_list(cpus: Sequence[int]) -> str:
    """(0, 1, 2, 3, 8) -> '0-3,8'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def physical_cores(cpus: Sequence[int],
                   siblings: Callable[[int], tuple[int, ...]] = _siblings) -> list[tuple[int, ...]]:
    """The logical CPUs of `cpus` grouped by physical core (hyper-thread siblings together),
    in order of their lowest CPU."""
    usable, seen, cores = set(cpus), set(), []
    for c in sorted(usable):
        if c in seen:
            continue
        core = tuple(sorted(usable & (set(siblings(c)) | {c})))
        seen.update(core)
        cores.append(core)
    return cores


def plan_world(cores: Sequence[tuple[int, ...]], workers: int, threads: int = 0,
               device: str = "cpu") -> list[ThreadPlan]:
    """One plan per rank: [rank 0, worker 1, ..., worker `workers`]. `threads` 0 (auto): on CPU
    the cores are split evenly over the workers (extra ones to the lowest ranks) and rank 0,
    which needs ~0.04 cores (docs/benchmarks/threads.md), floats; on a GPU a few each.
    `threads` N: N per worker, bound to cores of its own only when they all fit."""
    n = len(cores)
    if workers < 1 or n < 1:
        raise ValueError(f"plan_world needs >= 1 worker and >= 1 core, got {workers} and {n}")
    router = ThreadPlan(1, (), "router")

    def flat(cs: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(c for core in cs for c in core)

    if threads == 0 and device != "cpu":
        share = max(1, n // workers)
        return [router] + [ThreadPlan(min(GPU_THREADS, share), flat(cores[i * share:(i + 1) * share])
                                      if n >= workers else (), f"auto, {device}")
                           for i in range(workers)]
    if threads and threads * workers > n:
        why = f"{threads} each, {workers} workers > {n} cores: not bound"
        return [router] + [ThreadPlan(threads, (), why)] * workers
    if not threads and n < workers:  # fewer cores than workers: one thread each, cores in turn
        return [router] + [ThreadPlan(1, cores[i % n], f"auto: {workers} workers on {n} cores")
                           for i in range(workers)]
    if threads:
        sizes, why = [threads] * workers, f"{threads} each"
    else:  # an even split, the extra cores to the lowest ranks
        base, extra = divmod(n, workers)
        sizes, why = [base + (i < extra) for i in range(workers)], f"auto: {n} cores, {workers} workers"
    plans, start = [router], 0
    for k in sizes:  # each worker the next k cores
        plans.append(ThreadPlan(k, flat(cores[start:start + k]), why))
        start += k
    return plans


def usable_cores() -> list[tuple[int, ...]]:
    """This process's affinity mask as physical cores."""
    return physical_cores(sorted(os.sched_getaffinity(0)))


def apply(plan: ThreadPlan) -> tuple[int, str]:
    """Bind the calling thread (and the threads it starts later) to `plan.cpus`, set torch's
    intra-op threads; returns what is now in effect, as `in_effect`."""
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    torch.set_num_threads(plan.threads)
    return in_effect()


def in_effect() -> tuple[int, str]:
    """(torch intra-op threads, affinity mask as a CPU list) of the calling thread now."""
    return torch.get_num_threads(), format_cpu_list(sorted(os.sched_getaffinity(0)))
