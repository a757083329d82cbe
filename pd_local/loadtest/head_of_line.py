"""The head-of-line report: what each long prompt cost the requests around it, in units of its
own TTFT (definitions: docs/loadtest.md, head_of_line), from a `head_of_line` run's results."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from pd_local.loadtest.client import RequestResult
from pd_local.loadtest.workloads import KIND_BASELINE, KIND_LONG, KIND_SHORT, KIND_STREAM


class HeadOfLineError(ValueError):
    """The results are not a head_of_line run the report can use (the message says why)."""


def chunk_times_abs(r: RequestResult) -> list[float]:
    """The request's content-chunk arrival times on the run's clock."""
    return [r.start + t for t in r.chunk_times]


def gaps_overlapping(times: Sequence[float], lo: float, hi: float) -> list[float]:
    """Gaps between consecutive `times` whose interval overlaps [lo, hi] (a gap that ends
    exactly at `lo` or starts exactly at `hi` does not)."""
    return [b - a for a, b in zip(times, times[1:]) if b > lo and a < hi]


def _p99(values: Sequence[float]) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 99)) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def head_of_line_report(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Per long prompt, in units of its TTFT L: each short chat's extra wait and each stream's
    largest gap; run-wide, the worst of each and the ITL p99 ratio. HeadOfLineError when a long
    prompt or a baseline chat is missing or failed; failed shorts are counted."""
    by_kind: dict[str, list[RequestResult]] = {}
    for r in sorted(results, key=lambda r: (r.start, r.index)):
        by_kind.setdefault(r.kind, []).append(r)
    longs, baseline = by_kind.get(KIND_LONG, []), by_kind.get(KIND_BASELINE, [])
    streams, shorts = by_kind.get(KIND_STREAM, []), by_kind.get(KIND_SHORT, [])
    if not longs or not baseline:
        raise HeadOfLineError(f"a head_of_line run needs long prompts and baseline chats "
                              f"(got {len(longs)} long, {len(baseline)} baseline)")
    bad = [r for r in (*longs, *baseline) if not r.success or r.ttft is None]
    if bad:
        raise HeadOfLineError(f"{len(bad)} long prompt(s)/baseline chat(s) failed, first: "
                              f"{bad[0].kind} #{bad[0].index}: {bad[0].error}")
    base_ttft = [r.ttft for r in baseline]
    stream_times = [chunk_times_abs(s) for s in streams]
    t_quiet_end = baseline[0].start
    quiet = [b - a for ts in stream_times for a, b in zip(ts, ts[1:]) if b <= t_quiet_end]
    base_end = max(r.start + r.chunk_times[-1] for r in baseline)
    base_gaps = [g for ts in stream_times for g in gaps_overlapping(ts, t_quiet_end, base_end)]
    interfered: list[float] = []
    groups: list[dict[str, Any]] = []
    failed_shorts = 0
    for k, long in enumerate(longs):
        L = float(long.ttft)  # type: ignore[arg-type]
        lo, hi = long.start, long.start + L
        nxt = longs[k + 1].start if k + 1 < len(longs) else math.inf
        group = [r for r in shorts if long.start <= r.start < nxt]
        waits: list[float | None] = []
        for j, r in enumerate(group):
            if not r.success or r.ttft is None:
                failed_shorts += 1
                waits.append(None)
                continue
            ref = base_ttft[j] if j < len(base_ttft) else float(np.median(base_ttft))
            waits.append((r.ttft - ref) / L)
        gaps: list[float | None] = []
        for s, ts in zip(streams, stream_times):
            over = gaps_overlapping(ts, lo, hi)
            interfered += over
            covered = bool(ts) and ts[-1] >= hi  # still streaming when the window ended
            gaps.append(max(over) / L if over and covered else None)
        groups.append({
            "long_index": long.index, "long_sent_s": long.start, "L_s": L,
            "short_ttft_s": [r.ttft if r.success else None for r in group],
            "short_extra_wait_L": waits,
            "stream_max_gap_L": gaps,
        })
    waits_all = [w for g in groups for w in g["short_extra_wait_L"] if w is not None]
    gaps_all = [x for g in groups for x in g["stream_max_gap_L"] if x is not None]
    q99, i99, b99 = _p99(quiet), _p99(interfered), _p99(base_gaps)
    return {
        "baseline_ttft_s": base_ttft,
        "groups": groups,
        "max_short_extra_wait_L": max(waits_all) if waits_all else None,
        "max_stream_gap_L": max(gaps_all) if gaps_all else None,
        "failed_shorts": failed_shorts,
        "stream_gaps_quiet": len(quiet), "stream_gaps_interfered": len(interfered),
        "stream_gaps_baseline": len(base_gaps),
        "itl_p99_quiet_s": q99, "itl_p99_interfered_s": i99, "itl_p99_baseline_s": b99,
        "itl_p99_ratio": _ratio(i99, q99), "itl_p99_ratio_vs_baseline": _ratio(i99, b99),
    }


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_head_of_line(rep: dict[str, Any]) -> str:
    """The printed table: one row per long prompt, then the run-wide figures."""
    header = ["long", "L (s)", "short extra wait / L", "stream max gap / L"]
    rows = [[str(i + 1), _f(g["L_s"]), " ".join(_f(w) for w in g["short_extra_wait_L"]) or "-",
             " ".join(_f(x) for x in g["stream_max_gap_L"]) or "-"]
            for i, g in enumerate(rep["groups"])]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["-" * 18 + " head of line (units of L) " + "-" * 18]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines += [f"{'worst short extra wait:':<34} {_f(rep['max_short_extra_wait_L'])} L",
              f"{'worst stream gap:':<34} {_f(rep['max_stream_gap_L'])} L",
              f"{'baseline short TTFT (s):':<34} "
              + " ".join(_f(t, 3) for t in rep["baseline_ttft_s"]),
              f"{'stream ITL p99 interfered/quiet:':<34} {_f(rep['itl_p99_ratio'])} "
              f"({_f(rep['itl_p99_interfered_s'], 3)} s / {_f(rep['itl_p99_quiet_s'], 3)} s, "
              f"{rep['stream_gaps_interfered']} / {rep['stream_gaps_quiet']} gaps)",
              f"{'stream ITL p99 interfered/baseline:':<34} "
              f"{_f(rep['itl_p99_ratio_vs_baseline'])} ({_f(rep['itl_p99_baseline_s'], 3)} s, "
              f"{rep['stream_gaps_baseline']} baseline gaps)"]
    if rep["failed_shorts"]:
        lines.append(f"{'failed short chats:':<34} {rep['failed_shorts']}")
    return "\n".join(lines)
