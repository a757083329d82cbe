"""A run's result as JSON (vLLM `bench serve` field names) and as a table for people.

Per-request arrays (`--save-detailed`) are in seconds, as vLLM writes them; summary fields say
their unit in their name (`_ms`, `_throughput` per second).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pd_local.loadtest.metrics import METRICS, percentile_label
from pd_local.loadtest.runner import RunResult


def json_number(x: float) -> float | str:
    """JSON has no infinity: `inf` is written as the string "inf"."""
    return "inf" if math.isinf(x) else x


def detailed_fields(run: RunResult) -> dict[str, list[Any]]:
    """Per-request arrays, index-aligned, in send order."""
    rs = run.results
    return {
        "start_times": [r.start for r in rs],
        "kinds": [r.kind for r in rs],
        "input_lens": [r.input_len for r in rs],
        "output_lens": [r.output_tokens for r in rs],
        "ttfts": [r.ttft if r.success else None for r in rs],
        "tpots": [r.tpot for r in rs],
        "e2els": [r.e2el if r.success else None for r in rs],
        "itls": [r.itl if r.success else [] for r in rs],
        "chunk_times": [r.chunk_times for r in rs],
        "chunk_tokens": [r.chunk_tokens for r in rs],
        "pd_local_timings_by_request": [r.server_timings for r in rs],
        "errors": [r.error for r in rs],
        **({"conversations": [r.conversation for r in rs], "turns": [r.turn for r in rs]}
           if any(r.turn is not None for r in rs) else {}),
    }


def result_json(meta: dict[str, Any], summary: dict[str, Any], run: RunResult,
                detailed: bool) -> dict[str, Any]:
    """`meta` (run settings) + `summary` (metrics.summarize) [+ per-request arrays]."""
    out: dict[str, Any] = {"date": run.started_at, "start_monotonic": run.start_monotonic,
                           **meta, **summary}
    if run.modes:
        out["rank_modes"] = [{"t": t, "modes": m} for t, m in run.modes]
    if detailed:
        out.update(detailed_fields(run))
    return out


MODE_CHARS = {"mixed": "m", "prefill": "P", "decode": "D"}


def format_modes(modes: Sequence[tuple[float, dict[str, str]]], duration: float, width: int = 60) -> str:
    """Each elastic rank's mode over the run, one character per `duration / width` seconds (the
    last sample in it; blank: none yet): m mixed, P mostly-prefill, D mostly-decode."""
    step = max(duration, 1e-9) / width
    ranks = sorted({r for _, m in modes for r in m}, key=int)
    lines = [f"rank modes over {duration:.0f} s (one character per {step:.1f} s: m mixed, "
             "P mostly-prefill, D mostly-decode)"]
    for rank in ranks:
        cells = [" "] * width
        for t, m in modes:
            if rank in m:
                cells[min(width - 1, int(t / step))] = MODE_CHARS.get(m[rank], "?")
        for i in range(1, width):  # a cell with no sample keeps the mode before it
            cells[i] = cells[i - 1] if cells[i] == " " else cells[i]
        lines.append(f"  rank {rank:>3} |{''.join(cells)}|")
    return "\n".join(lines)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _latency_rows(summary: dict[str, Any], percentiles: Sequence[float], label: str = ""
                  ) -> list[list[str]]:
    stats = ["mean", "median", "std"] + [percentile_label(p) for p in percentiles]
    rows = []
    for m in METRICS:
        name = m.upper() + (f" [{label}]" if label else "")
        rows.append([name] + [_fmt(summary.get(f"{s}_{m}_ms")) for s in stats])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header)] + [line(r) for r in rows]


def format_table(meta: dict[str, Any], summary: dict[str, Any],
                 percentiles: Sequence[float]) -> str:
    """The stdout report: counts, throughputs, SLO, latency table, TTFT by turn (multiturn),
    server timings, errors."""
    def kv(key: str, value: Any) -> str:
        return f"{key + ':':<34} {value}"

    rate = meta.get("request_rate")
    lines = ["=" * 22 + " pd-local bench " + "=" * 22,
             kv("Target", f"{meta.get('base_url')}{meta.get('endpoint')}  model {meta.get('model_id')}"),
             kv("Workload", f"{meta.get('workload')}, rate {rate} req/s, burstiness "
                f"{meta.get('burstiness')}, max concurrency {meta.get('max_concurrency') or '-'}"),
             kv("Successful requests", summary["completed"]),
             kv("Failed requests", summary["failed"]),
             kv("Duration (s)", _fmt(summary["duration"])),
             kv("Total input tokens", summary["total_input_tokens"]),
             kv("Total output tokens", summary["total_output_tokens"]),
             kv("Request throughput (req/s)", _fmt(summary["request_throughput"])),
             kv("Output token throughput (tok/s)", _fmt(summary["output_throughput"])),
             kv("Total token throughput (tok/s)", _fmt(summary["total_token_throughput"]))]
    slo = meta.get("slo_ms")
    if slo:
        att = summary["slo_attainment"]
        lines += [kv("SLO (ms)", ", ".join(f"{k}<={v:g}" for k, v in slo.items())),
                  kv("SLO attainment (%)", _fmt(None if att is None else 100 * att, 1)),
                  kv("Request goodput (req/s)", _fmt(summary["request_goodput"]))]
        for kind, entry in (summary.get("per_kind") or {}).items():
            att = entry.get("slo_attainment")
            lines.append(kv(f"  {kind}", f"attainment {_fmt(None if att is None else 100 * att, 1)}%, "
                            f"goodput {_fmt(entry.get('request_goodput'))} req/s"))
    stats = ["mean", "median", "std"] + [percentile_label(p) for p in percentiles]
    rows = _latency_rows(summary, percentiles)
    for kind, entry in (summary.get("per_kind") or {}).items():
        rows += _latency_rows(entry, percentiles, kind)
    lines += ["-" * 22 + " latency (ms) " + "-" * 24]
    lines += _table(["metric"] + stats, rows)
    turns = summary.get("per_turn") or []
    if turns:
        lines += ["-" * 20 + " TTFT by turn (ms) " + "-" * 21]
        lines += _table(["turn", "ok", "failed", "mean in", "mean", "p50", "p90"],
                        [[str(t["turn"]), str(t["completed"]), str(t["failed"]),
                          _fmt(t["mean_input_len"], 0), _fmt(t["mean_ttft_ms"]),
                          _fmt(t["p50_ttft_ms"]), _fmt(t["p90_ttft_ms"])] for t in turns])
    timings = summary.get("pd_local_timings") or {}
    if timings:
        lines += ["-" * 16 + " server timings (pd_local) " + "-" * 17]
        trows = [[k, str(v["count"])] + [_fmt(v[s]) for s in stats] for k, v in timings.items()]
        lines += _table(["key", "n"] + stats, trows)
    errors = summary.get("error_counts") or {}
    if errors:
        lines += ["-" * 26 + " errors " + "-" * 26]
        for reason, n in list(errors.items())[:5]:
            lines.append(f"{n:>6}  {reason[:200]}")
        if len(errors) > 5:
            lines.append(f"        ... {len(errors) - 5} more distinct errors (see --result-file)")
    lines.append("=" * 60)
    return "\n".join(lines)
