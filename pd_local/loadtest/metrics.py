"""Pure metric math with vLLM `bench serve`'s conventions: numpy's default percentiles, None for
no samples, statistics and throughputs over successful requests, SLO attainment = good / issued,
goodput = good / duration (docs/loadtest.md)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from pd_local.loadtest.client import RequestResult

DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)
SLO_KEYS: tuple[str, ...] = ("ttft", "tpot", "e2el")
METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")


def percentile_label(p: float) -> str:
    """`p90`, `p99`, `p99.9`: the name vLLM gives a percentile field."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def stats(values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES
          ) -> dict[str, float | None]:
    """mean, median, std and the given percentiles of `values` (same unit); all None if empty."""
    keys = ["mean", "median", "std"] + [percentile_label(p) for p in percentiles]
    if len(values) == 0:
        return {k: None for k in keys}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {
        "mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p, key in zip(percentiles, keys[3:]):
        out[key] = float(np.percentile(arr, p))
    return out


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=200,tpot=50,e2el=5000` (milliseconds) -> {"ttft": 200.0, ...}.

    Raises ValueError with a message fit for the user on anything else: unknown or repeated
    metric, missing `=`, a value that is not a positive finite number.
    """
    slo: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"{part!r} is not METRIC=MS")
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO metric {key!r} (use {', '.join(SLO_KEYS)})")
        if key in slo:
            raise ValueError(f"{key} is given twice")
        try:
            ms = float(val)
        except ValueError:
            raise ValueError(f"{key}={val!r}: not a number of milliseconds") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"{key}={val}: must be a positive number of milliseconds")
        slo[key] = ms
    if not slo:
        raise ValueError("empty SLO (expected e.g. ttft=200,tpot=50)")
    return slo


def is_good(res: RequestResult, slo_ms: dict[str, float]) -> bool:
    """Whether `res` succeeded and meets every bound in `slo_ms` (inclusive)."""
    if not res.success:
        return False
    values = {"ttft": res.ttft, "tpot": res.tpot, "e2el": res.e2el}
    for key, bound in slo_ms.items():
        v = values[key]
        if v is None:
            if key == "tpot":
                continue  # one output token: no decode time to judge
            return False
        if v * 1000.0 > bound:
            return False
    return True


def _metric_values(results: Iterable[RequestResult], metric: str) -> list[float]:
    """Seconds: TTFT/TPOT/E2EL per successful request, or every ITL gap pooled."""
    ok = [r for r in results if r.success]
    if metric == "itl":
        return [g for r in ok for g in r.itl]
    vals = [getattr(r, metric) for r in ok]
    return [v for v in vals if v is not None]


def latency_fields(results: Sequence[RequestResult], percentiles: Sequence[float]
                   ) -> dict[str, float | None]:
    """`mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p90_ttft_ms`, ... for every metric."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        ms = [v * 1000.0 for v in _metric_values(results, metric)]
        for stat, value in stats(ms, percentiles).items():
            out[f"{stat}_{metric}_ms"] = value
    return out


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(results: Sequence[RequestResult], duration: float,
              slo_ms: dict[str, float] | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              kind_durations: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's summary with vLLM `bench serve` field names (module docstring), plus
    `slo_attainment`, `error_counts`, `per_kind` (when the workload mixes kinds; its goodput
    over `kind_durations` where given) and `pd_local_timings` (statistics of each numeric key
    the server sent under `pd_local`)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": _div(len(ok), duration),
        "output_throughput": _div(total_out, duration),
        "total_token_throughput": _div(total_in + total_out, duration),
        "request_goodput": None,
        "slo_attainment": None,
    }
    if slo_ms:
        good = sum(is_good(r, slo_ms) for r in results)
        out["request_goodput"] = _div(good, duration)
        out["slo_attainment"] = _div(good, len(results))
    out.update(latency_fields(results, percentiles))
    out["error_counts"] = dict(Counter(r.error for r in results if not r.success).most_common())
    kinds = sorted({r.kind for r in results})
    if len(kinds) > 1:
        per_kind: dict[str, Any] = {}
        for kind in kinds:
            rs = [r for r in results if r.kind == kind]
            entry: dict[str, Any] = {"completed": sum(r.success for r in rs),
                                     "failed": sum(not r.success for r in rs)}
            if slo_ms:
                good = sum(is_good(r, slo_ms) for r in rs)
                entry["slo_attainment"] = _div(good, len(rs))
                if kind_durations and kind in kind_durations:
                    entry["request_goodput"] = _div(good, kind_durations[kind])
            entry.update(latency_fields(rs, percentiles))
            per_kind[kind] = entry
        out["per_kind"] = per_kind
    timings: dict[str, list[float]] = {}
    for r in ok:
        for key, v in r.server_timings.items():
            timings.setdefault(key, []).append(v)
    out["pd_local_timings"] = {
        key: {"count": len(vals), **stats(vals, percentiles)} for key, vals in sorted(timings.items())
    }
    return out


@dataclass(frozen=True)
class RateAtAttainment:
    """The highest rate at which a target meets the attainment goal; status "interpolated",
    "at_least" (met at every tested rate), "below_lowest" (rate None) or "no_data"."""

    rate: float | None
    status: str


def max_rate_at_attainment(points: Iterable[tuple[float, float | None]], target: float
                           ) -> RateAtAttainment:
    """DistServe's capacity: interpolated between the last rate meeting `target` and the first that
    misses it, walking upwards (later recoveries ignored; None attainments skipped)."""
    pts = sorted((r, a) for r, a in points if a is not None)
    if not pts:
        return RateAtAttainment(None, "no_data")
    if pts[0][1] < target:
        return RateAtAttainment(None, "below_lowest")
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < target:
            return RateAtAttainment(r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated")
    return RateAtAttainment(pts[-1][0], "at_least")


@dataclass(frozen=True)
class CapacityRatio:
    """`numerator`'s capacity over `denominator`'s. `bound` is "=" (both interpolated), ">="
    or "<=" (one side censored by the tested range), or None with `value` None (undefined)."""

    numerator: str
    denominator: str
    value: float | None
    bound: str | None
    note: str


def capacity_ratio(num_name: str, num: RateAtAttainment, den_name: str, den: RateAtAttainment
                   ) -> CapacityRatio:
    """Goodput ratio at the attainment target, with how far the tested range supports it."""
    if num.rate is None or den.rate is None or den.rate <= 0:
        missing = [n for n, c in ((num_name, num), (den_name, den)) if c.rate is None]
        return CapacityRatio(num_name, den_name, None, None,
                             f"undefined: {', '.join(missing)} missed the target at every rate "
                             "tested; test lower rates")
    value = num.rate / den.rate
    if num.status == "interpolated" and den.status == "interpolated":
        return CapacityRatio(num_name, den_name, value, "=", "")
    if num.status == "at_least" and den.status == "interpolated":
        return CapacityRatio(num_name, den_name, value, ">=",
                             f"{num_name} met the target at every rate tested; test higher rates")
    if num.status == "interpolated" and den.status == "at_least":
        return CapacityRatio(num_name, den_name, value, "<=",
                             f"{den_name} met the target at every rate tested; test higher rates")
    return CapacityRatio(num_name, den_name, None, None,
                         "undefined: both met the target at every rate tested; test higher rates")
