"""The analysing half of the study: latency statistics, SLO calibration, attainment and
goodput sweeps, bootstrap bands, and study.json / runs/*.json (written and read back, so
`--reanalyse` redoes all of this without measuring).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pd_local.loadtest.client import RequestResult
from pd_local.loadtest.metrics import (capacity_ratio, is_good, max_rate_at_attainment, stats,
                                       summarize)
from pd_local.loadtest.report import result_json
from pd_local.loadtest.runner import RunResult
from pd_local.loadtest.sweep import SweepCollector, Target, sweep_json
from pd_local.loadtest.workloads import KIND_LONG, KIND_SHORT
from study.settings import PERCENTILES, REPO, STALL_MS, TOPOLOGIES, Run, Settings


def of_kind(run: RunResult, kind: str) -> list[RequestResult]:
    return [r for r in run.results if r.kind == kind]


def ms_stats(values: Sequence[float]) -> dict[str, float | None]:
    out = stats([1000 * v for v in values], PERCENTILES)
    out["max"] = 1000 * max(values) if values else None
    out["n"] = len(values)
    return out


def latency(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Latency statistics (ms) of `results`, including each stream's worst gap: one stall of
    2 s in a 96-token stream is 1% of its gaps, so the pooled ITL p99 can miss what a reader
    sees; `stalled_streams` is the share of streams with a gap over STALL_MS."""
    ok = [r for r in results if r.success]
    worst = [max(r.itl) for r in ok if r.itl]
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "stream_max_itl_ms": ms_stats(worst),
        "stalled_streams": sum(w * 1000 > STALL_MS for w in worst) / len(worst) if worst else None,
        "ttft_ms": ms_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": ms_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": ms_stats([g for r in ok for g in r.itl]),
        "server_timings_ms": {
            k: stats([r.server_timings[k] for r in ok if k in r.server_timings], (50.0, 90.0))
            for k in sorted({k for r in ok for k in r.server_timings})},
    }


def ceil_to(x: float, step: int) -> int:
    """`x` rounded up to a multiple of `step`; within 1 ppm of a multiple counts as on it."""
    return step * math.ceil(x / step - 1e-6)


def calibrate_slo(runs: list[Run], st: Settings) -> tuple[dict[str, float], dict[str, Any]]:
    """TTFT bound: `ttft_factor` x the slower topology's median unloaded TTFT of a long prompt
    (rounded up to 100 ms); TPOT bound: `tpot_factor` x the slower median unloaded TPOT of a
    short chat (rounded up to 5 ms). Returns (slo_ms, the measured inputs)."""
    unloaded: dict[str, dict[str, float]] = {}
    for r in runs:
        if r.phase.startswith("calibration-"):
            kind = r.phase.split("-", 1)[1]
            ok = [x for x in r.run.results if x.success]
            u = unloaded.setdefault(r.topology, {})
            u[f"{kind}_ttft_ms"] = 1000 * float(np.median([x.ttft for x in ok]))
            tpots = [x.tpot for x in ok if x.tpot is not None]
            u[f"{kind}_tpot_ms"] = 1000 * float(np.median(tpots)) if tpots else math.nan
    if st.slo is not None:
        return dict(st.slo), unloaded
    long_ttft = max(u["long_ttft_ms"] for u in unloaded.values())
    short_tpot = max(u["short_tpot_ms"] for u in unloaded.values())
    slo = {"ttft": ceil_to(st.ttft_factor * long_ttft, 100),
           "tpot": ceil_to(st.tpot_factor * short_tpot, 5)}
    return slo, unloaded


def meets(x: RequestResult, slo: dict[str, float], max_gap_ms: float | None) -> bool:
    """The bench tool's SLO test, plus (when given) no gap between tokens over `max_gap_ms`."""
    if not is_good(x, slo):
        return False
    return max_gap_ms is None or not x.itl or 1000 * max(x.itl) <= max_gap_ms


def sweep_for(runs: list[Run], topologies: list[str], slo: dict[str, float], st: Settings,
              max_gap_ms: float | None = None) -> dict[str, Any]:
    """The bench tool's sweep JSON, with attainment/goodput/latencies of the short chats."""
    targets = [Target(t, t) for t in topologies]
    col = SweepCollector(targets, list(st.sweep_rates), st.attainment, slo)
    extra: dict[tuple[str, float], dict[str, Any]] = {}
    for r in runs:
        if r.phase != "sweep":
            continue
        rate = float(r.rate or 0)
        summary = summarize(r.run.results, r.run.duration, slo)
        shorts = of_kind(r.run, KIND_SHORT)
        good = sum(meets(x, slo, max_gap_ms) for x in shorts)
        row = {**summary, **summary.get("per_kind", {}).get(KIND_SHORT, {}),
               "slo_attainment": good / len(shorts) if shorts else None,
               "request_goodput": good / r.run.duration}
        col.add(Target(r.topology, r.topology), rate, row, run_file(r))
        longs = [x.ttft for x in of_kind(r.run, KIND_LONG) if x.success and x.ttft is not None]
        extra[(r.topology, rate)] = {
            "all_requests_slo_attainment": summary["slo_attainment"],
            "short_requests": len(shorts),
            "long_median_ttft_ms": 1000 * float(np.median(longs)) if longs else None,
            "others_cpu_cores": r.cpu.get("others")}
    data = sweep_json(col)
    for t, tgt in data["targets"].items():
        for row in tgt["runs"]:
            row.update(extra[(t, row["request_rate"])])
    return data


def bootstrap_ratio(runs: list[Run], topologies: list[str], slo: dict[str, float],
                    max_gap_ms: float | None, goal: float, n: int = 1000, seed: int = 0
                    ) -> dict[str, Any]:
    """How much the capacity ratio moves with the luck of which requests a 30-s run got:
    resample each sweep run's short chats (with replacement, same count), recompute every
    attainment, both capacities and their ratio. Returns the 5/50/95th percentiles of the
    defined ratios and how many resamples had no defined ratio (a side missed the goal at every
    rate) or a censored one (a side met it at every rate)."""
    rng = np.random.default_rng(seed)
    good = {t: {} for t in topologies[:2]}
    for r in runs:
        if r.phase == "sweep" and r.topology in good:
            good[r.topology][float(r.rate or 0)] = np.array(
                [meets(x, slo, max_gap_ms) for x in of_kind(r.run, KIND_SHORT)], dtype=float)
    a, b = topologies[:2]
    values, undefined, censored = [], 0, 0
    for _ in range(n):
        caps = {}
        for t in (a, b):
            pts = [(rate, float(g[rng.integers(0, g.size, g.size)].mean()) if g.size else None)
                   for rate, g in sorted(good[t].items())]
            caps[t] = max_rate_at_attainment(pts, goal)
        ratio = capacity_ratio(a, caps[a], b, caps[b])
        if ratio.value is None:
            undefined += 1
        else:
            censored += ratio.bound != "="
            values.append(ratio.value)
    pct = [float(x) for x in np.percentile(values, [5, 50, 95])] if values else [None] * 3
    return {"resamples": n, "p5": pct[0], "p50": pct[1], "p95": pct[2],
            "undefined": undefined, "censored": censored}


def sensitivity(runs: list[Run], topologies: list[str], slo: dict[str, float],
                unloaded: dict[str, dict[str, float]], st: Settings) -> list[dict[str, Any]]:
    """The goodput ratio under alternative SLOs and attainment goals (same runs), each with a
    bootstrap interval, so that the choice and the noise can be judged."""
    short_ttft = max(u["short_ttft_ms"] for u in unloaded.values())
    goal = st.attainment
    variants: list[tuple[str, dict[str, float], float | None, float]] = [
        ("chosen", slo, None, goal)]
    if "tpot" in slo and len(slo) > 1:
        variants.append(("TPOT only", {"tpot": slo["tpot"]}, None, goal))
    if "ttft" in slo and len(slo) > 1:
        variants.append(("TTFT only", {"ttft": slo["ttft"]}, None, goal))
    if "tpot" in slo:
        variants += [("tighter TPOT (x0.75)", {**slo, "tpot": 0.75 * slo["tpot"]}, None, goal),
                     ("looser TPOT (x1.5)", {**slo, "tpot": 1.5 * slo["tpot"]}, None, goal)]
    variants += [
        ("chat TTFT 1 s", {**slo, "ttft": 1000.0}, None, goal),
        ("chat TTFT (5 x unloaded short)", {**slo, "ttft": 5 * short_ttft}, None, goal),
        (f"chosen + no gap > {STALL_MS:.0f} ms (not a bench SLO)", slo, STALL_MS, goal),
        (f"chosen, goal {100 * (goal - 0.05):g}%", slo, None, goal - 0.05),
        (f"chosen, goal {100 * min(goal + 0.05, 1.0):g}%", slo, None, min(goal + 0.05, 1.0)),
    ]
    out = []
    for label, v, gap, g in variants:
        data = sweep_for(runs, topologies, v, replace(st, attainment=g), gap)
        caps = {t: (data["targets"][t]["max_rate_at_attainment"],
                    data["targets"][t]["max_rate_status"]) for t in data["targets"]}
        ratio = data["goodput_ratios"][0] if data["goodput_ratios"] else None
        out.append({"label": label, "slo_ms": v, "max_gap_ms": gap, "attainment_goal": g,
                    "capacity": caps, "ratio": ratio,
                    "bootstrap": bootstrap_ratio(runs, topologies, v, gap, g, seed=st.seed)})
    return out


def run_file(r: Run) -> str:
    tag = f"_rate{r.rate:g}" if r.phase == "sweep" else ""
    return f"runs/{r.topology}_{r.phase}{tag}.json"


def rounded(x: Any) -> Any:
    """Floats to 6 significant digits, recursively (microseconds for times in seconds)."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def write_compact(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(obj), separators=(",", ":"), allow_nan=False) + "\n")


def provenance() -> dict[str, Any]:
    """When and on what code the measurement ran (the servers import pd_local from REPO)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git("rev-parse",
                                                                                   "HEAD"),
            "pd_local_uncommitted_changes": git("status", "--porcelain", "--", "pd_local") != "",
            "cpu_count": os.cpu_count()}


def analyse(runs: list[Run], topologies: list[str], st: Settings, out: Path,
            origin: dict[str, Any] | None = None) -> dict[str, Any]:
    slo, unloaded = calibrate_slo(runs, st)
    by = {(r.topology, r.phase): r for r in runs if r.phase != "sweep"}
    inter: dict[str, Any] = {}
    for t in topologies:
        base, itf = by[(t, "baseline")].run, by[(t, "interference")].run
        b, i = latency(base.results), latency(of_kind(itf, KIND_SHORT))
        lg = latency(of_kind(itf, KIND_LONG))
        inter[t] = {
            "baseline_short": b, "interference_short": i, "interference_long": lg,
            "itl_p99_ratio": (i["itl_ms"]["p99"] or math.nan) / (b["itl_ms"]["p99"] or math.nan),
            "itl_p99.9_ratio": (i["itl_ms"]["p99.9"] or math.nan)
            / (b["itl_ms"]["p99.9"] or math.nan),
            "ttft_p99_ratio": (i["ttft_ms"]["p99"] or math.nan) / (b["ttft_ms"]["p99"] or math.nan),
            "stream_max_itl_p90_ratio": (i["stream_max_itl_ms"]["p90"] or math.nan)
            / (b["stream_max_itl_ms"]["p90"] or math.nan),
        }
    sweep = sweep_for(runs, topologies, slo, st)
    result = {
        "provenance": origin or {},
        "settings": {**asdict(st), "max_model_len": st.max_model_len},
        "topologies": {t: TOPOLOGIES[t] for t in topologies},
        "unloaded_ms": unloaded, "slo_ms": slo,
        "slo_rule": None if st.slo else
        f"ttft = {st.ttft_factor} x slower unloaded long-prompt TTFT (ceil 100 ms); "
        f"tpot = {st.tpot_factor} x slower unloaded short-chat TPOT (ceil 5 ms)",
        "interference": inter, "sweep": sweep,
        "sensitivity": sensitivity(runs, topologies, slo, unloaded, st) if len(topologies) > 1
        else [],
        "cpu_cores_used": {f"{r.topology} {r.phase}" + (f" {r.rate:g}/s" if r.phase == "sweep"
                                                         else ""): r.cpu for r in runs},
        "run_files": [run_file(r) for r in runs],
    }
    for r in runs:
        meta = {"topology": r.topology, "phase": r.phase, "request_rate": r.rate,
                "cpu_cores_used": r.cpu}
        write_compact(out / run_file(r),
                      result_json(meta, summarize(r.run.results, r.run.duration, slo,
                                                  PERCENTILES), r.run, detailed=True))
    (out / "study.json").write_text(json.dumps(rounded(result), indent=1) + "\n")
    return result


def load_runs(src: Path) -> tuple[Settings, list[str], list[Run], dict[str, Any]]:
    """The runs of an earlier study from its study.json and runs/*.json (per-request arrays),
    so that the analysis can be redone (another SLO, other pictures) without measuring."""
    study = json.loads((src / "study.json").read_text())
    saved = {k: v for k, v in study["settings"].items() if k != "max_model_len"}
    saved["sweep_rates"] = tuple(saved["sweep_rates"])
    st = Settings(**saved)
    runs = []
    for name in study["run_files"]:
        d = json.loads((src / name).read_text())
        results = []
        for i, kind in enumerate(d["kinds"]):
            ok = d["errors"][i] == ""
            results.append(RequestResult(
                index=i, kind=kind, input_len=d["input_lens"][i],
                requested_output_len=d["output_lens"][i], start=d["start_times"][i],
                success=ok, error=d["errors"][i], ttft=d["ttfts"][i], e2el=d["e2els"][i],
                output_tokens=d["output_lens"][i], chunk_times=d["chunk_times"][i],
                chunk_tokens=d["chunk_tokens"][i], itl=d["itls"][i],
                server_timings=d["pd_local_timings_by_request"][i]))
        run = RunResult(results, d["duration"], d["date"], d["start_monotonic"])
        runs.append(Run(d["topology"], d["phase"], d["request_rate"], run, d["cpu_cores_used"]))
    return st, list(study["topologies"]), runs, study.get("provenance", {})


