"""The study's pictures (PNGs) and results.md tables, from `analysis.analyse`'s result."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pd_local.loadtest.runner import RunResult
from pd_local.loadtest.sweep import sweep_markdown
from pd_local.loadtest.workloads import KIND_LONG, KIND_SHORT
from study.settings import STALL_MS, Run
from study.analysis import of_kind


def plots(runs: list[Run], result: dict[str, Any], out: Path) -> list[Path]:
    from pd_local.loadtest.plots import plot_run, plot_sweep, require_matplotlib

    plt = require_matplotlib()
    paths: list[Path] = []
    topologies = list(result["interference"])
    for t in topologies:
        run = next(r.run for r in runs if r.topology == t and r.phase == "interference")
        paths += plot_run(run, out / f"{t}-interference")
        # A zoom on the second long prompt (the first may still meet a cold cache or allocator).
        longs = [r for r in of_kind(run, KIND_LONG) if r.success]
        if longs:
            lg = longs[min(1, len(longs) - 1)]
            lo, hi = lg.start - 3.0, lg.start + (lg.e2el or 0) + 3.0
            sub = [r for r in run.results if lo <= r.start <= hi or
                   (r.start < lo and r.start + (r.e2el or 0) > lo)]
            zoom = RunResult(sub, run.duration, run.started_at, run.start_monotonic)
            zdir = out / f"{t}-interference" / "zoom"
            for p in plot_run(zoom, zdir):
                if p.name == "timeline.png":
                    target = out / f"{t}-interference" / "timeline_zoom.png"
                    p.replace(target)
                    paths.append(target)
                else:
                    p.unlink()
            zdir.rmdir()
    paths.append(stall_figure(plt, runs, topologies, out / "stalls.png"))
    # ITL CDF of the short chats, baseline vs interference, both topologies on one axis.
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"1p1d": "tab:blue", "colocated-2": "tab:orange"}
    for t in topologies:
        for phase, style in (("baseline", ":"), ("interference", "-")):
            run = next(r.run for r in runs if r.topology == t and r.phase == phase)
            gaps = np.sort([1000 * g for r in of_kind(run, KIND_SHORT) if r.success
                            for g in r.itl])
            if gaps.size == 0:
                continue
            p99 = float(np.percentile(gaps, 99))
            ax.step(np.maximum(gaps, 1.0), 1 - np.arange(gaps.size) / gaps.size, where="post",
                    linestyle=style, color=colors.get(t), label=f"{t} {phase} (p99 {p99:.0f} ms)")
    for q, name in ((0.01, "p99"), (0.001, "p99.9")):
        ax.axhline(q, color="gray", linewidth=0.8, linestyle="--")
        ax.annotate(name, (10.5, q), textcoords="offset points", xytext=(0, 3), fontsize=8,
                    color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(left=10.0)
    ax.set_xlabel("inter-token latency of the short chats (ms)")
    ax.set_ylabel("fraction of gaps > x")
    ax.set_title("ITL tail: steady short chats, without (dotted) and with (solid) long prompts")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    path = out / "itl_ccdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    paths.append(plot_sweep(result["sweep"], out / "sweep.png"))
    return paths


def stall_figure(plt: Any, runs: list[Run], topologies: list[str], path: Path) -> Path:
    """The interference runs around their second long prompt, one panel per topology on a
    shared y axis (the bench tool's timeline scales each run to its own largest gap). The
    schedules are identical, so both panels show the same requests."""
    fig, axes = plt.subplots(len(topologies), 1, figsize=(12, 3.2 * len(topologies)),
                             sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, t in zip(axes[:, 0], topologies):
        run = next(r.run for r in runs if r.topology == t and r.phase == "interference")
        longs = [r for r in of_kind(run, KIND_LONG) if r.success]
        if not longs:
            continue
        lg = longs[min(1, len(longs) - 1)]
        lo, hi = lg.start - 3.0, lg.start + (lg.e2el or 0) + 3.0
        for i, r in enumerate(x for x in of_kind(run, KIND_SHORT) if x.success):
            ts = r.start + np.asarray(r.chunk_times)
            if ts[-1] < lo or ts[0] > hi:
                continue
            ax.plot(ts[1:], 1000 * np.diff(ts), drawstyle="steps-pre", color=cmap(i % 10),
                    linewidth=1.0)
        ax.axvspan(lg.start, lg.start + (lg.ttft or 0), color="tab:red", alpha=0.12,
                   label="long prompt: sent -> first token")
        ax.set_xlim(lo, hi)
        ax.set_title(f"{t}: gaps between tokens of each short chat (one line per stream)")
        ax.set_ylabel("gap (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time since the run started (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(x: Any, d: int = 0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{d}f}"


CPU_COLUMNS = ("rank0", "rank1", "rank2", "client", "idle_servers", "others", "machine")


def tables(result: dict[str, Any]) -> str:
    s = result["settings"]
    prov = result.get("provenance") or {}
    measured = ""
    if prov:
        dirty = " (pd_local with uncommitted changes)" if prov.get(
            "pd_local_uncommitted_changes") else ""
        measured = (f" from a measurement of {prov['measured_at']} at commit "
                    f"{prov['git_commit'][:7]}{dirty}")
    lines = [
        "# pd_vs_colocated: generated tables",
        "",
        f"Generated by `benchmarks/pd_vs_colocated.py` on {time.strftime('%Y-%m-%d %H:%M')}"
        f"{measured}. "
        f"Short chats: {s['short_input']} +- {100 * s['range_ratio']:.0f}% tokens in, "
        f"{s['short_output']} +- {100 * s['range_ratio']:.0f}% out (ignore_eos), Poisson "
        f"{s['rate']:g}/s for {s['duration']:g} s; long prompt {s['long_input']} tokens "
        f"({s['long_output']} out) every {s['long_every']:g} s. Model "
        f"{s['model'] or 'server default (SmolLM2-135M-Instruct)'}, {s['dtype']}.",
        "",
        "## Unloaded (one request at a time, median)",
        "",
        "| topology | short TTFT ms | short TPOT ms | long TTFT ms |",
        "|---|---:|---:|---:|",
    ]
    for t, u in result["unloaded_ms"].items():
        lines.append(f"| {t} | {fmt(u.get('short_ttft_ms'))} | {fmt(u.get('short_tpot_ms'), 1)}"
                     f" | {fmt(u.get('long_ttft_ms'))} |")
    lines += ["", "## Interference (short chats only)", "",
              "| topology | phase | ITL p50 | ITL p99 | ITL p99.9 | ITL max | worst gap per "
              f"stream p50 / p90 | streams with a gap > {STALL_MS:.0f} ms | TTFT p50 | "
              "TTFT p90 | TTFT p99 | TPOT p50 | failed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, d in result["interference"].items():
        for phase in ("baseline_short", "interference_short", "interference_long"):
            x = d[phase]
            lines.append(
                f"| {t} | {phase.replace('_', ' ')} | {fmt(x['itl_ms']['p50'])} | "
                f"{fmt(x['itl_ms']['p99'])} | {fmt(x['itl_ms']['p99.9'])} | "
                f"{fmt(x['itl_ms']['max'])} | {fmt(x['stream_max_itl_ms']['p50'])} / "
                f"{fmt(x['stream_max_itl_ms']['p90'])} | "
                f"{fmt(100 * x['stalled_streams'] if x['stalled_streams'] is not None else None)}%"
                f" | {fmt(x['ttft_ms']['p50'])} | "
                f"{fmt(x['ttft_ms']['p90'])} | {fmt(x['ttft_ms']['p99'])} | "
                f"{fmt(x['tpot_ms']['p50'], 1)} | {x['failed']}/{x['requests']} |")
    lines += ["", "Headline, ITL p99 interference / baseline: " + ", ".join(
        f"{t} {d['itl_p99_ratio']:.2f}x" for t, d in result["interference"].items())
        + "; ITL p99.9: " + ", ".join(
        f"{t} {d['itl_p99.9_ratio']:.2f}x" for t, d in result["interference"].items()), ""]
    lines += ["## CPU cores used during each run (average; 2 cores in the machine)", "",
              "| run | " + " | ".join(CPU_COLUMNS) + " |", "|---|" + "---:|" * len(CPU_COLUMNS)]
    for run, use in result["cpu_cores_used"].items():
        lines.append(f"| {run} | " + " | ".join(fmt(use.get(c), 2) for c in CPU_COLUMNS) + " |")
    lines.append("")
    lines += ["## Server phase timings under interference (median ms, short / long)", ""]
    for t, d in result["interference"].items():
        ss, ll = d["interference_short"]["server_timings_ms"], d["interference_long"][
            "server_timings_ms"]
        parts = [f"{k} {fmt(ss[k]['median'], 1)} / {fmt(ll.get(k, {}).get('median'), 1)}"
                 for k in ss]
        lines.append(f"- {t}: " + "; ".join(parts))
    lines += ["", "## Sweep (short chats; a long prompt every "
              f"{s['long_every']:g} s in every run)", "",
              sweep_markdown(result["sweep"]), "## SLO sensitivity (same runs)", "",
              "Bootstrap: each sweep run's short chats resampled 1000 times; the ratio's "
              "5th-95th percentiles, and how many resamples left it undefined (a side missed "
              "the goal at every rate) or censored (a side met it at every rate).", "",
              "| SLO | " + " | ".join(f"{t} capacity (short/s)" for t in result["interference"])
              + " | ratio | bootstrap 5-95% | undefined / censored |",
              "|---|" + "---:|" * (len(result["interference"]) + 3)]
    for v in result["sensitivity"]:
        slo = ", ".join(f"{k}<={x:.0f}" for k, x in v["slo_ms"].items())
        caps = []
        for rate, status in v["capacity"].values():
            caps.append("none" if rate is None else (">= " if status == "at_least" else "")
                        + f"{rate:.2f}")
        r = v["ratio"]
        ratio = "-" if r is None or r["ratio"] is None else \
            ("" if r["bound"] == "=" else r["bound"] + " ") + f"{r['ratio']:.2f}"
        bs = v["bootstrap"]
        band = "-" if bs["p5"] is None else f"{bs['p5']:.2f} - {bs['p95']:.2f}"
        lines.append(f"| {v['label']}: {slo} | " + " | ".join(caps) + f" | {ratio} | {band} | "
                     f"{bs['undefined']} / {bs['censored']} |")
    return "\n".join(lines) + "\n"


