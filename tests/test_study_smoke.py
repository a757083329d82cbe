"""The PD-vs-colocated study script (benchmarks/pd_vs_colocated.py) without servers: its
workloads, its SLO calibration, its analysis and pictures on synthetic runs with known answers.

The script's measuring half (launching `pd-local serve` twice, ~13 minutes) is exercised by
`python benchmarks/pd_vs_colocated.py --quick`, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pd_local.loadtest.client import RequestResult
from pd_local.loadtest.runner import RunResult
from pd_local.loadtest.workloads import KIND_LONG, KIND_SHORT

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pd_vs_colocated.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("pd_vs_colocated", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pd_vs_colocated"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["pd_vs_colocated"]


def settings(study, **kw):
    st = study.parse_args(["--sweep-rates", "1,2,3"]).settings
    return study.replace(st, **kw) if kw else st


def request(kind: str, start: float, ttft: float, gaps: list[float], index: int = 0
            ) -> RequestResult:
    """A successful streamed request whose tokens came `ttft` then `gaps` seconds apart."""
    chunks = [ttft]
    for g in gaps:
        chunks.append(chunks[-1] + g)
    return RequestResult(index=index, kind=kind, input_len=64, requested_output_len=len(chunks),
                         start=start, success=True, ttft=ttft, e2el=chunks[-1],
                         output_tokens=len(chunks), chunk_times=chunks,
                         chunk_tokens=[1] * len(chunks), itl=list(gaps),
                         finish_reason="length")


def run_of(results: list[RequestResult], duration: float = 10.0) -> RunResult:
    return RunResult(results, duration, "2026-01-01T00:00:00", 0.0)


def test_help_exits_zero() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)})
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--sweep-rates" in out.stdout


def test_quick_settings_are_small(study) -> None:
    cli = study.parse_args(["--quick"])
    st = cli.settings
    assert not cli.one_at_a_time and cli.wait_quiet == 0
    assert cli.out == Path("/tmp/pd_vs_colocated_quick")
    assert cli.topologies == ["1p1d", "colocated-2"]
    assert st.duration <= 12 and st.sweep_duration <= 8 and len(st.sweep_rates) == 2
    full_cli = study.parse_args([])
    full = full_cli.settings
    assert full_cli.out == SCRIPT.parent.parent / "docs" / "benchmarks"
    # The default long prompt fits the default context (prompt + template + output <= 2048).
    assert full.max_model_len == 2048
    assert study.replace(full, long_input=3000).max_model_len == 4096


def test_plan_alternates_topologies(study) -> None:
    st = settings(study)
    steps = study.plan(st, ["a", "b"], one_at_a_time=False)
    assert [(s.topology, s.phase, s.rate) for s in steps[:6]] == [
        ("a", "calibration-short", None), ("b", "calibration-short", None),
        ("b", "calibration-long", None), ("a", "calibration-long", None),
        ("a", "baseline", 1.0), ("b", "baseline", 1.0)]
    assert [(s.topology, s.rate) for s in steps if s.phase == "sweep"] == [
        ("a", 1.0), ("b", 1.0), ("b", 2.0), ("a", 2.0), ("a", 3.0), ("b", 3.0)]
    seq = study.plan(st, ["a", "b"], one_at_a_time=True)
    assert sorted(seq, key=lambda s: s.topology == "b") == seq  # all of a, then all of b
    assert sorted(map(repr, seq)) == sorted(map(repr, steps))


def test_baseline_is_interference_without_longs(study) -> None:
    st = settings(study)
    with_longs = study.interference_schedule(st, 2.0, 30.0, longs=True)
    without = study.interference_schedule(st, 2.0, 30.0, longs=False)
    longs = [it for it in with_longs if it.spec.kind == KIND_LONG]
    assert [it.offset for it in longs] == [10.0, 20.0]  # every --long-every s, not at 0
    assert all(it.spec.kind == KIND_SHORT for it in without)
    # The same shorts at the same times: the runs differ only by the long prompts.
    assert [(it.offset, it.spec) for it in with_longs if it.spec.kind == KIND_SHORT] == \
        [(it.offset, it.spec) for it in without]
    assert len(without) > 40


def synthetic_runs(study) -> list:
    """Two topologies; answers chosen by hand (see the assertions)."""
    runs = []
    cpu = {"rank0": 0.1, "client": 0.05, "others": 0.0, "machine": 1.0}
    for topo, long_ttft, stall in (("1p1d", 2.0, 0.05), ("colocated-2", 1.8, 2.0)):
        def add(phase, rate, results):
            runs.append(study.Run(topo, phase, rate, run_of(results), cpu))
        add("calibration-short", None, [request(KIND_SHORT, 0, 0.1, [0.03] * 95)] * 3)
        add("calibration-long", None, [request(KIND_LONG, 0, long_ttft, [0.03] * 15)] * 3)
        base = [request(KIND_SHORT, i, 0.1, [0.04] * 98 + [0.1]) for i in range(10)]
        add("baseline", 1.0, base)
        # Under interference half the streams see one gap of `stall` seconds.
        itf = [request(KIND_SHORT, i, 0.2, [0.04] * 98 + [stall if i % 2 else 0.1])
               for i in range(10)] + [request(KIND_LONG, 5, long_ttft, [0.03] * 15)]
        add("interference", 1.0, itf)
        # Sweep: good shorts have TPOT 40 ms, bad ones 80 ms (the SLO will be 60 ms).
        good_at = {"1p1d": {1.0: 10, 2.0: 10, 3.0: 5}, "colocated-2": {1.0: 10, 2.0: 7, 3.0: 2}}
        for rate, n_good in good_at[topo].items():
            shorts = [request(KIND_SHORT, i, 0.2, [0.04 if i < n_good else 0.08] * 20)
                      for i in range(10)]
            # The long prompt misses the TTFT bound; the SLO is judged on the shorts only.
            add("sweep", rate, shorts + [request(KIND_LONG, 5, 9.0, [0.03] * 15)])
    return runs


def test_analysis_on_known_runs(study, tmp_path: Path) -> None:
    st = settings(study)
    runs = synthetic_runs(study)
    result = study.analyse(runs, ["1p1d", "colocated-2"], st, tmp_path)
    # SLO: 1.25 x the slower long TTFT (2000 ms) -> 2500; 2 x the short TPOT (30 ms) -> 60.
    assert result["slo_ms"] == {"ttft": 2500, "tpot": 60}
    inter = result["interference"]
    # Pooled baseline ITL over 990 gaps: 980 of 40 ms, 10 of 100 ms; numpy's p99 is at rank
    # 0.99 * 989 = 979.11, between the last 40 and the first 100: 40 + 0.11 * 60.
    assert inter["1p1d"]["baseline_short"]["itl_ms"]["p99"] == pytest.approx(46.6)
    assert inter["colocated-2"]["interference_short"]["stalled_streams"] == 0.5
    assert inter["1p1d"]["interference_short"]["stalled_streams"] == 0.0
    assert inter["colocated-2"]["interference_short"]["stream_max_itl_ms"]["max"] == \
        pytest.approx(2000.0)
    assert inter["colocated-2"]["itl_p99.9_ratio"] > 10 > inter["1p1d"]["itl_p99.9_ratio"]
    sweep = result["sweep"]["targets"]
    # Attainment 1.0, 1.0, 0.5 -> 2 + 0.1 / 0.5 = 2.2; 1.0, 0.7 -> 1 + 0.1 / 0.3 = 1.333.
    assert sweep["1p1d"]["max_rate_at_attainment"] == pytest.approx(2.2)
    assert sweep["colocated-2"]["max_rate_at_attainment"] == pytest.approx(1 + 1 / 3)
    ratio = result["sweep"]["goodput_ratios"][0]
    assert (ratio["numerator"], ratio["denominator"], ratio["bound"]) == \
        ("1p1d", "colocated-2", "=")
    assert ratio["ratio"] == pytest.approx(2.2 / (4 / 3))
    # The long prompt (TTFT 9 s) fails the SLO but does not count against the shorts.
    row = sweep["1p1d"]["runs"][0]
    assert row["slo_attainment"] == 1.0 and row["all_requests_slo_attainment"] < 1.0
    assert row["request_goodput"] == pytest.approx(1.0)  # 10 good shorts in 10 s
    assert result["sensitivity"][0]["label"] == "chosen"
    assert result["sensitivity"][1]["slo_ms"] == {"tpot": 60}
    # With "no gap over 500 ms" added, the interference runs are unchanged (not in the sweep),
    # and the sweep's shorts have no such gap: the same capacities.
    rows = {row["label"]: row for row in result["sensitivity"]}
    gap = rows["chosen + no gap > 500 ms (not a bench SLO)"]
    assert gap["max_gap_ms"] == 500 and gap["ratio"]["ratio"] == pytest.approx(1.65)
    # Goal 95%: 1p1d 2 + 0.05 / 0.5 = 2.1, colocated-2 1 + 0.05 / 0.3 = 1.1667.
    assert rows["chosen, goal 95%"]["ratio"]["ratio"] == pytest.approx(2.1 / (1 + 0.05 / 0.3))
    # Runs where every short is good (or bad) resample to themselves: at 1 req/s both sides
    # always meet the goal, so every resample's ratio is defined and the band holds 1.65.
    bs = rows["chosen"]["bootstrap"]
    assert bs["resamples"] == 1000 and bs["undefined"] == 0
    assert bs["p5"] <= 1.65 <= bs["p95"]
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["slo_ms"] == {"ttft": 2500, "tpot": 60}
    detailed = json.loads((tmp_path / "runs" / "colocated-2_interference.json").read_text())
    assert len(detailed["itls"]) == 11 and detailed["cpu_cores_used"]["rank0"] == 0.1
    md = study.tables(result)
    assert "| chosen: ttft<=2500, tpot<=60 | 2.20 | 1.33 | 1.65 |" in md
    assert "Headline, ITL p99 interference / baseline: 1p1d" in md


def test_fixed_slo_overrides_calibration(study, tmp_path: Path) -> None:
    st = settings(study, slo={"tpot": 70.0})
    result = study.analyse(synthetic_runs(study), ["1p1d", "colocated-2"], st, tmp_path)
    assert result["slo_ms"] == {"tpot": 70.0} and result["slo_rule"] is None
    # 80 ms TPOTs still miss: the capacities are the same as with the calibrated SLO.
    assert result["sweep"]["targets"]["1p1d"]["max_rate_at_attainment"] == pytest.approx(2.2)


def test_plots(study, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    st = settings(study)
    runs = synthetic_runs(study)
    result = study.analyse(runs, ["1p1d", "colocated-2"], st, tmp_path)
    paths = study.plots(runs, result, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert {"1p1d-interference/timeline.png", "colocated-2-interference/timeline_zoom.png",
            "itl_ccdf.png", "sweep.png", "stalls.png"} <= names
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert not (tmp_path / "1p1d-interference" / "zoom").exists()


def test_provenance_names_the_commit(study) -> None:
    p = study.provenance()
    assert len(p["git_commit"]) == 40 and p["cpu_count"] >= 1
    assert isinstance(p["pd_local_uncommitted_changes"], bool)


def test_cpu_accounting_sees_this_process(study) -> None:
    a = study.cpu_snapshot(os.getpid() + 10**7)  # no such server: ours is the client alone
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:  # burn CPU in this process
        sum(i * i for i in range(20_000))
    b = study.cpu_snapshot(os.getpid() + 10**7)
    use = study.cpu_use(a, b)
    assert use["client"] >= 0 and use["others"] >= 0 and use["idle_servers"] == 0
    # Both counters advance in clock ticks (1/CLK_TCK s), sampled at slightly different moments:
    # over a window of dt seconds each may be off by a tick or two. A 50 ms window once read
    # 1.27 cores for the client against 1.02 for the machine; 0.6 s keeps that error near 0.03.
    dt = b.t - a.t
    assert use["client"] > 0.1  # it did burn CPU, even on a loaded machine
    assert use["machine"] >= use["client"] - 0.05 - 4 / os.sysconf("SC_CLK_TCK") / dt
    assert set(use) >= {"client", "ours", "idle_servers", "others", "machine"}


def test_reanalyse_from_saved_runs(study, tmp_path: Path) -> None:
    st = settings(study)
    first = study.analyse(synthetic_runs(study), ["1p1d", "colocated-2"], st, tmp_path / "a")
    saved, topologies, runs, origin = study.load_runs(tmp_path / "a")
    assert origin == {}
    assert topologies == ["1p1d", "colocated-2"] and saved == st
    again = study.analyse(runs, topologies, saved, tmp_path / "b")
    assert again["slo_ms"] == first["slo_ms"]
    assert again["interference"]["colocated-2"]["itl_p99.9_ratio"] == pytest.approx(
        first["interference"]["colocated-2"]["itl_p99.9_ratio"], rel=1e-4)
    assert again["sweep"]["goodput_ratios"] == first["sweep"]["goodput_ratios"]
    # Through the CLI, with another SLO: only the analysis changes.
    assert study.main(["--reanalyse", str(tmp_path / "a"), "--out-dir", str(tmp_path / "c"),
                       "--slo", "tpot=90"]) == 0
    redone = json.loads((tmp_path / "c" / "study.json").read_text())
    assert redone["provenance"] == {}
    assert redone["slo_ms"] == {"tpot": 90.0}
    assert redone["sweep"]["targets"]["1p1d"]["max_rate_status"] == "at_least"
    assert (tmp_path / "c" / "sweep.png").exists() and (tmp_path / "c" / "results.md").exists()
