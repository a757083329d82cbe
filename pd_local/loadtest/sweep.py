"""Rate sweeps over targets (pure): SLO attainment and goodput per rate, and DistServe's
comparison: each target's highest rate meeting the attainment goal (interpolated), and their
ratio."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from pd_local.loadtest.metrics import capacity_ratio, max_rate_at_attainment

# Per-run fields copied into the sweep's JSON (the full result is in each run's own file).
RUN_FIELDS: tuple[str, ...] = (
    "completed", "failed", "duration", "slo_attainment", "request_goodput", "request_throughput",
    "output_throughput", "mean_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "p90_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "p99_e2el_ms",
)


@dataclass(frozen=True)
class Target:
    """A named server under test, from `--target NAME=URL`."""

    name: str
    base_url: str


def parse_target(text: str) -> Target:
    """`pd=http://127.0.0.1:8000` -> Target. Raises ValueError with a user-facing message."""
    name, sep, url = text.partition("=")
    name, url = name.strip(), url.strip()
    if not sep or not name or not url:
        raise ValueError(f"{text!r} is not NAME=URL")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{text!r}: the URL must start with http:// or https://")
    return Target(name, url.rstrip("/"))


@dataclass
class SweepCollector:
    """Accumulates one summary per (target, rate); order of `add` calls is free."""

    targets: list[Target]
    rates: list[float]
    attainment_target: float
    slo_ms: dict[str, float]
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, target: Target, rate: float, summary: dict[str, Any],
            result_file: str | None = None) -> None:
        row = {"request_rate": rate, **{k: summary.get(k) for k in RUN_FIELDS}}
        if result_file:
            row["result_file"] = result_file
        self.runs.setdefault(target.name, []).append(row)


def sweep_json(c: SweepCollector) -> dict[str, Any]:
    """Everything the sweep found, including capacities and pairwise ratios (earlier-listed
    target over later-listed)."""
    targets: dict[str, Any] = {}
    caps = {}
    for t in c.targets:
        runs = sorted(c.runs.get(t.name, []), key=lambda r: r["request_rate"])
        cap = max_rate_at_attainment(((r["request_rate"], r["slo_attainment"]) for r in runs),
                                     c.attainment_target)
        caps[t.name] = cap
        targets[t.name] = {"base_url": t.base_url, "runs": runs,
                           "max_rate_at_attainment": cap.rate, "max_rate_status": cap.status}
    ratios = []
    for a, b in combinations([t.name for t in c.targets], 2):
        r = capacity_ratio(a, caps[a], b, caps[b])
        ratios.append({"numerator": a, "denominator": b, "ratio": r.value, "bound": r.bound,
                       "note": r.note})
    return {"attainment_target": c.attainment_target, "slo_ms": c.slo_ms,
            "rates": sorted(c.rates), "targets": targets, "goodput_ratios": ratios}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def sweep_markdown(data: dict[str, Any]) -> str:
    """A markdown report: one row per rate, attainment and goodput per target, then the
    capacities and ratios."""
    names = list(data["targets"])
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in data["slo_ms"].items())
    goal = data["attainment_target"]
    lines = [f"SLO: {slo}; attainment goal {100 * goal:g}%", ""]
    header = ["rate (req/s)"]
    for n in names:
        header += [f"{n} attainment", f"{n} goodput (req/s)", f"{n} p99 TTFT (ms)",
                   f"{n} p99 TPOT (ms)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    by_rate: dict[str, dict[float, dict[str, Any]]] = {
        n: {r["request_rate"]: r for r in data["targets"][n]["runs"]} for n in names}
    for rate in data["rates"]:
        row = [f"{rate:g}"]
        for n in names:
            r = by_rate[n].get(rate, {})
            row += [_pct(r.get("slo_attainment")), _num(r.get("request_goodput")),
                    _num(r.get("p99_ttft_ms")), _num(r.get("p99_tpot_ms"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Highest rate meeting {100 * goal:g}% attainment (linear interpolation):", ""]
    for n in names:
        t = data["targets"][n]
        status = t["max_rate_status"]
        if t["max_rate_at_attainment"] is None:
            text = "none (missed the goal at every rate tested)" if status == "below_lowest" \
                else "no data"
        elif status == "at_least":
            text = f">= {t['max_rate_at_attainment']:.2f} req/s (met at every rate tested)"
        else:
            text = f"{t['max_rate_at_attainment']:.2f} req/s"
        lines.append(f"- {n}: {text}")
    for r in data["goodput_ratios"]:
        if r["ratio"] is None:
            text = r["note"]
        else:
            bound = "" if r["bound"] == "=" else r["bound"] + " "
            text = f"{bound}{r['ratio']:.2f}" + (f" ({r['note']})" if r["note"] else "")
        lines.append(f"- goodput ratio {r['numerator']} / {r['denominator']}: {text}")
    return "\n".join(lines) + "\n"
