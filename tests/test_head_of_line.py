"""The head_of_line workload of `pd-local bench`: its schedule, its report's arithmetic (by hand),
its argument checks, and one run end to end against a real server (tiny model, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pd_local.loadtest.cli import main as bench_main
from pd_local.loadtest.client import RequestResult
from pd_local.loadtest.head_of_line import (HeadOfLineError, format_head_of_line,
                                            gaps_overlapping, head_of_line_report)
from pd_local.loadtest.workloads import WorkloadConfig, head_of_line_count, make_schedule


def test_schedule_times_kinds_and_lengths() -> None:
    cfg = WorkloadConfig(name="head_of_line", input_len=8, output_len=4, long_input_len=50,
                         long_output_len=2, long_every=2.0, streams=2, stream_output_len=99,
                         num_longs=2, shorts_per_long=3, short_delay=0.3, range_ratio=0.5)
    sched = list(make_schedule(cfg, 1.0, 1.0, None, None, seed=0, chat=True))
    got = [(s.offset, s.spec.kind) for s in sched]
    assert got == ([(0.0, "stream")] * 2 + [(2.0, "baseline")] * 3 + [(4.0, "long")]
                   + [(4.3, "short")] * 3 + [(6.0, "long")] + [(6.3, "short")] * 3)
    assert len(sched) == head_of_line_count(cfg)
    lens = {(s.spec.kind, s.spec.input_len, s.spec.output_len) for s in sched}
    # range_ratio is ignored: every short chat has exactly the baseline's lengths
    assert lens == {("stream", 8, 99), ("baseline", 8, 4), ("short", 8, 4), ("long", 50, 2)}
    texts = [s.spec.messages[0]["content"] for s in sched]
    assert len(set(texts)) == len(texts)  # no twin a prefix cache could serve
    assert list(make_schedule(cfg, 1.0, 1.0, None, None, seed=0, chat=True)) == sched


def _res(index: int, kind: str, start: float, chunks_abs: list[float],
         ok: bool = True) -> RequestResult:
    r = RequestResult(index=index, kind=kind, input_len=8, requested_output_len=4, start=start,
                      success=ok, error="" if ok else "boom")
    r.chunk_times = [t - start for t in chunks_abs]
    r.ttft = r.chunk_times[0] if chunks_abs else None
    return r


def hand_made_run() -> list[RequestResult]:
    """Streams from 0; baseline chats at 2.0 (TTFT .2/.3/.4); a long prompt at 4.0 with L = 2.0
    (window [4, 6]); short chats at 4.3 with TTFT 1.0, 1.3 and one failure."""
    return [
        _res(0, "stream", 0.0, [0.5, 1.0, 1.5, 2.5, 3.0, 4.5, 5.9, 6.4, 7.0]),
        _res(1, "stream", 0.0, [0.4, 0.9, 3.5, 5.0]),  # ended inside the window
        _res(2, "baseline", 2.0, [2.2]), _res(3, "baseline", 2.0, [2.3]),
        _res(4, "baseline", 2.0, [2.4]),
        _res(5, "long", 4.0, [6.0]),
        _res(6, "short", 4.3, [5.3]), _res(7, "short", 4.3, [5.6]),
        _res(8, "short", 4.3, [], ok=False),
    ]


def test_report_arithmetic_by_hand() -> None:
    rep = head_of_line_report(hand_made_run())
    (g,) = rep["groups"]
    assert g["L_s"] == pytest.approx(2.0) and g["long_sent_s"] == 4.0
    # (1.0 - 0.2) / 2, (1.3 - 0.3) / 2, failed
    assert g["short_extra_wait_L"] == [pytest.approx(0.4), pytest.approx(0.5), None]
    # stream 0: gaps overlapping [4, 6] are 3.0->4.5, 4.5->5.9, 5.9->6.4: max 1.5 = 0.75 L;
    # stream 1 stopped before 6.0: says nothing about the window
    assert g["stream_max_gap_L"] == [pytest.approx(0.75), None]
    assert rep["max_short_extra_wait_L"] == pytest.approx(0.5)
    assert rep["max_stream_gap_L"] == pytest.approx(0.75)
    assert rep["failed_shorts"] == 1
    # quiet: gaps ending by 2.0 (0.5, 0.5 of stream 0; 0.5 of stream 1)
    assert rep["stream_gaps_quiet"] == 3 and rep["itl_p99_quiet_s"] == pytest.approx(0.5)
    interfered = [1.5, 1.4, 0.5, 1.5]  # stream 1: 0.9->3.5 ends before 4, 3.5->5.0 counts
    assert rep["stream_gaps_interfered"] == 4
    assert rep["itl_p99_interfered_s"] == pytest.approx(np.percentile(interfered, 99))
    assert rep["itl_p99_ratio"] == pytest.approx(np.percentile(interfered, 99) / 0.5)
    # baseline window [2.0, 2.4]: stream 0's 1.5->2.5, stream 1's 0.9->3.5
    assert rep["stream_gaps_baseline"] == 2
    assert rep["itl_p99_baseline_s"] == pytest.approx(np.percentile([1.0, 2.6], 99))
    assert rep["itl_p99_ratio_vs_baseline"] == pytest.approx(
        np.percentile(interfered, 99) / np.percentile([1.0, 2.6], 99))
    table = format_head_of_line(rep)
    assert "0.40 0.50 -" in table and "0.75 -" in table and "failed short chats" in table


def test_gap_overlap_edges() -> None:
    assert gaps_overlapping([0.0, 1.0, 2.0, 3.0], 1.0, 2.0) == [1.0]  # touching ends: out
    assert gaps_overlapping([0.0, 5.0], 1.0, 2.0) == [5.0]  # silent across the whole window
    assert gaps_overlapping([], 0.0, 1.0) == []


def test_report_needs_a_long_prompt_and_a_baseline() -> None:
    run = hand_made_run()
    with pytest.raises(HeadOfLineError, match="needs long prompts and baseline"):
        head_of_line_report([r for r in run if r.kind != "baseline"])
    run[5] = _res(5, "long", 4.0, [], ok=False)
    with pytest.raises(HeadOfLineError, match="long #5: boom"):
        head_of_line_report(run)


@pytest.mark.parametrize("argv, message", [
    (["--num-prompts", "5"], "fixed schedule"),
    (["--range-ratio", "0.2"], "--range-ratio must be 0"),
    (["--short-delay", "6", "--long-every", "5"], "must be shorter than --long-every"),
    (["--short-delay", "-1"], "must be a finite number >= 0"),
])
def test_argument_errors(argv: list[str], message: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--workload", "head_of_line", "--model", "m", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tmp_path: Path, smollm2_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One stream, 2 baseline chats at 0.3 s, a ~300-token prompt at 0.6 s and 2 short chats
    0.05 s behind it, against a real engine behind real HTTP: the report is there, complete,
    in the JSON and on stdout. The stream (450 tokens, 4 layers) must outlive the long prompt:
    with native decode layers 2 layers decoded 450 tokens in under 1.2 s here."""
    from tests.helpers import make_tiny_hf_model
    from tests.server_utils import inprocess_server

    model = make_tiny_hf_model(tmp_path, tokenizer_dir=smollm2_dir, num_layers=4, seed=1)
    out = tmp_path / "hol.json"
    with inprocess_server(model, model_name="tiny") as url:
        code = bench_main(["--base-url", url, "--workload", "head_of_line", "--streams", "1",
                           "--stream-output-len", "450", "--long-every", "0.3",
                           "--short-delay", "0.05", "--shorts-per-long", "2",
                           "--input-len", "8", "--output-len", "4", "--long-input-len", "300",
                           "--long-output-len", "2", "--ignore-eos", "--quiet",
                           "--result-file", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "head of line (units of L)" in printed and "worst stream gap" in printed
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["workload"] == "head_of_line" and r["shorts_per_long"] == 2
    rep = r["head_of_line"]
    (g,) = rep["groups"]
    assert g["L_s"] > 0 and len(g["short_extra_wait_L"]) == 2
    assert all(isinstance(w, float) for w in g["short_extra_wait_L"])
    assert len(g["stream_max_gap_L"]) == 1 and len(rep["baseline_ttft_s"]) == 2
    assert rep["stream_gaps_quiet"] > 10  # the stream decoded alone for 0.3 s
    # the stream was still running when the rest had finished, and was ended by the client
    kinds = r["per_kind"]["stream"]
    assert kinds["completed"] == 1 and g["stream_max_gap_L"][0] is not None
