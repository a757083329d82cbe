"""PNG pictures of a run and of a sweep; matplotlib (optional) is imported only here, with Agg."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pd_local.loadtest.client import RequestResult
from pd_local.loadtest.runner import RunResult
from pd_local.loadtest.workloads import KIND_LONG

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pd_local[plot]' (or: pip install matplotlib)"
KIND_COLORS = {"short": "tab:blue", "request": "tab:blue", "long": "tab:red"}


class PlotUnavailable(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


def require_matplotlib() -> Any:
    """Return `matplotlib.pyplot` (Agg backend) or raise PlotUnavailable."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(f"plots need matplotlib, which is not installed: {INSTALL_HINT}"
                              ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_kind(results: Sequence[RequestResult], values: Any) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in results:
        if r.success:
            out.setdefault(r.kind, []).extend(values(r))
    return {k: v for k, v in out.items() if v}


def _distribution(plt: Any, data: dict[str, list[float]], title: str, xlabel: str,
                  path: Path) -> None:
    """Histogram (left, log counts so that a tail of rare stalls stays visible) and CDF (right,
    p50/p90/p99 of each kind as dots, their values in the legend). When the values span more
    than 20x the x axes are logarithmic; zeros (tokens that arrived in one chunk) are then drawn
    at the smallest positive value, and a note says how many."""
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    allv = np.concatenate([np.asarray(v, dtype=float) for v in data.values()]) if data \
        else np.zeros(0)
    if allv.size == 0:
        for ax in (ax_h, ax_c):
            ax.text(0.5, 0.5, "no successful requests", ha="center", va="center",
                    transform=ax.transAxes)
    else:
        pos = allv[allv > 0]
        floor = float(pos.min()) if pos.size else 1.0
        top = float(allv.max()) * 1.02 + 1e-9
        log_x = pos.size > 0 and float(pos.max()) / floor > 20
        bins = np.geomspace(floor, top, 60) if log_x else np.linspace(0.0, top, 60)
        for kind, vals in data.items():
            raw = np.sort(np.asarray(vals, dtype=float))
            shown = np.maximum(raw, floor) if log_x else raw
            color = KIND_COLORS.get(kind)
            pcts = {p: float(np.percentile(raw, p)) for p in (50, 90, 99)}
            label = f"{kind} (n={raw.size}): " + ", ".join(
                f"p{p} {v:.3g}" for p, v in pcts.items())
            ax_h.hist(shown, bins=bins, alpha=0.6, color=color, label=f"{kind} (n={raw.size})")
            ys = np.arange(1, raw.size + 1) / raw.size
            ax_c.step(shown, ys, where="post", color=color, label=label)
            ax_c.plot([max(v, floor) if log_x else v for v in pcts.values()],
                      [p / 100 for p in pcts], "o", color=color, markersize=5)
        zeros = int((allv == 0).sum())
        if log_x:
            ax_h.set_xscale("log")
            ax_c.set_xscale("log")
            if zeros:
                ax_c.text(0.02, 0.02, f"{zeros} values of 0 drawn at {floor:.3g}",
                          transform=ax_c.transAxes, fontsize=8, color="dimgray")
        ax_h.set_yscale("log")
        ax_h.legend()
        ax_c.set_ylim(0, 1.02)
        ax_c.legend(loc="lower right", fontsize=8, title="dots: p50, p90, p99",
                    title_fontsize=8)
    ax_h.set_xlabel(xlabel)
    ax_h.set_ylabel("count (log scale)")
    ax_h.set_title("histogram")
    ax_c.set_xlabel(xlabel)
    ax_c.set_ylabel("fraction of samples <= x")
    ax_c.set_title("CDF")
    ax_c.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark_longs(ax: Any, longs: Sequence[RequestResult], label: bool) -> None:
    """A red line at each long prompt's send time and a shaded band until its first token."""
    for i, r in enumerate(longs):
        ax.axvline(r.start, color="tab:red", linestyle="--", linewidth=1.2,
                   label="long prompt sent" if label and i == 0 else None)
        if r.ttft is not None:
            ax.axvspan(r.start, r.start + r.ttft, color="tab:red", alpha=0.12,
                       label="long prompt waiting for its first token" if label and i == 0
                       else None)


def _timeline(plt: Any, run: RunResult, path: Path) -> None:
    """Top: each request's TTFT at its send time. Bottom: each stream's inter-chunk gaps at
    the time they ended (one line per stream), long prompts' arrivals marked in both."""
    rs = run.results
    longs = [r for r in rs if r.kind == KIND_LONG]
    streams = [r for r in rs if r.success and r.kind != KIND_LONG and len(r.chunk_times) > 1]
    fig, (ax_t, ax_i) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 1.6]})
    for kind in sorted({r.kind for r in rs}):
        ok = [r for r in rs if r.kind == kind and r.success and r.ttft is not None]
        if ok:
            ax_t.scatter([r.start for r in ok], [1000 * r.ttft for r in ok], s=12,
                         color=KIND_COLORS.get(kind), label=f"TTFT, {kind}")
    failed = [r for r in rs if not r.success]
    if failed:
        ax_t.scatter([r.start for r in failed], [0] * len(failed), marker="x", color="black",
                     label=f"failed ({len(failed)})")
    _mark_longs(ax_t, longs, label=False)
    ax_t.set_ylabel("TTFT (ms)")
    ax_t.set_title("time to first token by send time")
    ax_t.grid(alpha=0.3)
    ax_t.legend(loc="upper left", fontsize=8)

    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(streams):
        t = r.start + np.asarray(r.chunk_times)
        gaps = 1000 * np.diff(np.asarray(r.chunk_times))
        # steps-pre: a gap is drawn as a plateau over the interval it covers (no token then).
        ax_i.plot(t[1:], gaps, color=cmap(i % 10), linewidth=0.9, alpha=0.75,
                  drawstyle="steps-pre")
    _mark_longs(ax_i, longs, label=True)
    ax_i.set_xlabel("time since the run started (s)")
    ax_i.set_ylabel("gap since the stream's previous chunk (ms)")
    what = "non-long streams" if longs else "streams"
    ax_i.set_title(f"inter-token gaps over time ({len(streams)} {what}, one line each)")
    ax_i.grid(alpha=0.3)
    if longs:
        ax_i.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run: RunResult, out_dir: Path) -> list[Path]:
    """Write ttft.png, itl.png and timeline.png (and modes.png, elastic ranks' modes, when the run
    watched them) into `out_dir`; return their paths."""
    plt = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "ttft.png", out_dir / "itl.png", out_dir / "timeline.png"]
    _distribution(plt, _by_kind(run.results, lambda r: [1000 * r.ttft]),
                  "Time to first token", "TTFT (ms)", paths[0])
    _distribution(plt, _by_kind(run.results, lambda r: [1000 * g for g in r.itl]),
                  "Inter-token latency (every output token after the first)", "ITL (ms)",
                  paths[1])
    _timeline(plt, run, paths[2])
    if run.modes:
        paths.append(out_dir / "modes.png")
        _modes(plt, run, paths[-1])
    return paths


def _modes(plt: Any, run: RunResult, path: Path) -> None:
    """Each elastic rank's mode over the run, a step line per rank (the bench's samples)."""
    levels = {"prefill": 0, "mixed": 1, "decode": 2}
    fig, ax = plt.subplots(figsize=(13, 3))
    for i, rank in enumerate(sorted({r for _, m in run.modes for r in m}, key=int)):
        pts = [(t, levels.get(m[rank], 1) + 0.08 * i) for t, m in run.modes if rank in m]
        ax.plot([t for t, _ in pts], [y for _, y in pts], drawstyle="steps-post", label=f"rank {rank}")
    ax.set_yticks(list(levels.values()), [f"mostly-{k}" if k != "mixed" else k for k in levels])
    ax.set_xlabel("time since the run started (s)")
    ax.set_title("elastic ranks' modes")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    """SLO attainment and goodput against request rate, one line per target (sweep.json's
    layout), with the attainment goal and each target's capacity marked."""
    plt = require_matplotlib()
    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(13, 4.8))
    goal = sweep["attainment_target"]
    max_rate = max(sweep["rates"])
    for i, (name, tgt) in enumerate(sweep["targets"].items()):
        color = plt.get_cmap("tab10")(i % 10)
        runs = tgt["runs"]
        rates = [r["request_rate"] for r in runs]
        att = [np.nan if r["slo_attainment"] is None else 100 * r["slo_attainment"] for r in runs]
        good = [np.nan if r["request_goodput"] is None else r["request_goodput"] for r in runs]
        ax_a.plot(rates, att, marker="o", color=color, label=name)
        ax_g.plot(rates, good, marker="o", color=color, label=name)
        cap = tgt["max_rate_at_attainment"]
        if cap is not None:
            ax_a.axvline(cap, color=color, linestyle=":", linewidth=1.2)
            sign = ">=" if tgt["max_rate_status"] == "at_least" else "="
            ax_a.annotate(f"{name} {sign} {cap:.2f}", (cap, goal * 100),
                          textcoords="offset points", xytext=(4, 6), color=color, fontsize=8)
    ax_a.axhline(goal * 100, color="gray", linestyle="--", linewidth=1,
                 label=f"goal {goal * 100:g}%")
    ax_a.set_ylim(-2, 102)
    ax_a.set_xlabel("request rate (req/s)")
    ax_a.set_ylabel("SLO attainment (%)")
    ax_a.set_title("SLO attainment")
    ax_g.plot([0, max_rate], [0, max_rate], color="gray", linestyle="--", linewidth=1,
              label="all requests good")
    ax_g.set_xlabel("request rate (req/s)")
    ax_g.set_ylabel("goodput (good req/s)")
    ax_g.set_title("request goodput")
    for ax in (ax_a, ax_g):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlim(0, max_rate * 1.12)  # room for the capacity labels at the right edge
    slo = ", ".join(f"{k}<={v:g} ms" for k, v in sweep["slo_ms"].items())
    fig.suptitle(f"SLO {slo}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
