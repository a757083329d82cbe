"""`pd-local bench --workload multiturn` (loadtest/conversation.py): histories, the per-turn
report, and one run against a real pd_local server (in-process, tiny random Llama with SmolLM2's
tokenizer) whose prompt token counts prove each turn carried the answers the server streamed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pd_local.loadtest import cli
from pd_local.loadtest.client import RequestOptions, RequestResult
from pd_local.loadtest.conversation import (
    Conversation, make_conversations, per_turn, run_conversations, turn_messages, turn_spec,
)
from pd_local.loadtest.report import detailed_fields, format_table
from pd_local.loadtest.runner import RunOptions, RunResult
from pd_local.loadtest.workloads import WorkloadConfig, WorkloadError, make_schedule

CONV = Conversation(0, "be brief", ("hi there", "and then", "bye"), (2, 2, 1), 8)


def test_turn_messages_carry_the_whole_history() -> None:
    assert turn_messages(CONV, [], 1) == [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi there"}]
    assert turn_messages(CONV, ["A1", "A2"], 3) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "and then"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "bye"}]
    no_system = Conversation(1, None, ("x",), (1,), 4)
    assert turn_messages(no_system, [], 1) == [{"role": "user", "content": "x"}]
    spec = turn_spec(CONV, ["one two three"], 2)
    assert spec.input_len == 2 + 2 + 3 + 2 and spec.output_len == 8 and spec.prompt is None


def test_turn_messages_refuse_a_missing_answer_or_turn() -> None:
    with pytest.raises(ValueError, match="turn 3 needs 2 earlier answers, got 1"):
        turn_messages(CONV, ["A1"], 3)
    with pytest.raises(ValueError, match=r"turn 4 outside 1\.\.3"):
        turn_messages(CONV, ["A1", "A2", "A3"], 4)


def test_conversations_shared_or_own_system_prompt_and_lengths() -> None:
    cfg = WorkloadConfig(name="multiturn", input_len=5, output_len=7, turns=4, system_len=30)
    shared = list(make_conversations(cfg, 2.0, 1.0, 5, None, seed=3))
    assert len(shared) == 5 and shared[0].offset == 0.0
    assert all(b.offset >= a.offset for a, b in zip(shared, shared[1:]))
    assert len({c.conversation.system for c in shared}) == 1
    for sc in shared:
        c = sc.conversation
        assert len(c.system.split()) == 30 and c.output_len == 7
        assert len(c.users) == 4 and [len(u.split()) for u in c.users] == [5] * 4
    again = list(make_conversations(cfg, 2.0, 1.0, 5, None, seed=3))
    assert again == shared  # deterministic per seed: every target gets the same conversations
    own = list(make_conversations(WorkloadConfig(name="multiturn", turns=2, system_len=30,
                                                 shared_system=False), 2.0, 1.0, 5, None, 3))
    assert len({c.conversation.system for c in own}) == 5
    none = next(make_conversations(WorkloadConfig(name="multiturn"), 1.0, 1.0, 1, None, 0))
    assert none.conversation.system is None
    with pytest.raises(WorkloadError, match="make_conversations"):
        next(make_schedule(cfg, 1.0, 1.0, 1, None, 0, True))


def _result(turn: int, ttft: float | None, ok: bool = True, input_len: int = 10
            ) -> RequestResult:
    return RequestResult(index=0, kind="request", input_len=input_len, requested_output_len=4,
                         success=ok, ttft=ttft, e2el=ttft, output_tokens=1, conversation=0,
                         turn=turn, error="" if ok else "boom")


def test_per_turn_ttft_exact() -> None:
    rs = [_result(1, 0.1), _result(1, 0.2), _result(1, 0.3), _result(1, 0.4), _result(1, 0.5),
          _result(2, 0.01, input_len=30), _result(2, 0.03, input_len=50), _result(2, None, False),
          _result(3, None, False)]
    got = per_turn(rs)
    assert [t["turn"] for t in got] == [1, 2, 3]
    t1, t2, t3 = got
    assert (t1["completed"], t1["failed"]) == (5, 0)
    assert t1["mean_ttft_ms"] == pytest.approx(300.0)
    assert t1["p50_ttft_ms"] == pytest.approx(300.0)
    assert t1["p90_ttft_ms"] == pytest.approx(460.0)  # linear: 400 + 0.6 * 100
    assert (t2["completed"], t2["failed"], t2["mean_input_len"]) == (2, 1, 40.0)
    assert t2["p50_ttft_ms"] == pytest.approx(20.0) and t2["p90_ttft_ms"] == pytest.approx(28.0)
    assert t3 == {"turn": 3, "completed": 0, "failed": 1, "mean_input_len": None,
                  "mean_ttft_ms": None, "p50_ttft_ms": None, "p90_ttft_ms": None}
    assert per_turn([RequestResult(0, "request", 1, 1)]) == []  # no turns: nothing


def test_per_turn_table_and_detailed_arrays() -> None:
    rs = [_result(1, 0.25), _result(2, 0.05)]
    summary = {"completed": 2, "failed": 0, "duration": 1.0, "total_input_tokens": 20,
               "total_output_tokens": 2, "request_throughput": 2.0, "output_throughput": 2.0,
               "total_token_throughput": 22.0, "per_turn": per_turn(rs)}
    table = format_table({"workload": "multiturn"}, summary, [90.0])
    lines = table.splitlines()
    head = next(i for i, ln in enumerate(lines) if "TTFT by turn" in ln)
    assert lines[head + 1].split() == ["turn", "ok", "failed", "mean", "in", "mean", "p50", "p90"]
    assert lines[head + 2].split() == ["1", "1", "0", "10", "250.00", "250.00", "250.00"]
    assert lines[head + 3].split() == ["2", "1", "0", "10", "50.00", "50.00", "50.00"]
    fields = detailed_fields(RunResult(rs, 1.0, "now", 0.0))
    assert fields["turns"] == [1, 2] and fields["conversations"] == [0, 0]
    plain = detailed_fields(RunResult([RequestResult(0, "request", 1, 1)], 1.0, "now", 0.0))
    assert "turns" not in plain


def test_multiturn_needs_the_chat_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--workload", "multiturn", "--endpoint", "/v1/completions"])
    assert rc == 2
    assert "--workload multiturn sends message histories" in capsys.readouterr().err
    assert cli.main(["--workload", "multiturn", "--think-time", "-1"]) == 2
    assert "-1: must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_multiturn_against_a_real_server(tmp_path: Path, smollm2_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each turn's prompt, as the server counted it, is exactly the chat template of the
    system prompt, every earlier user message and streamed answer, and the new message."""
    from pd_local.tokenizer import Tokenizer
    from tests.helpers import make_tiny_hf_model
    from tests.server_utils import inprocess_server

    model_dir = make_tiny_hf_model(tmp_path / "m", tokenizer_dir=smollm2_dir, num_layers=2,
                                   seed=5)
    tok = Tokenizer.from_dir(model_dir)
    cfg = WorkloadConfig(name="multiturn", input_len=6, output_len=5, turns=3, system_len=40,
                         think_time=0.05)
    with inprocess_server(model_dir) as url:
        convs = list(make_conversations(cfg, 20.0, 1.0, 2, None, seed=1))
        opts = RunOptions(RequestOptions(url=url + "/v1/chat/completions",
                                         model="smollm2-135m-instruct", chat=True,
                                         ignore_eos=True, timeout=60))
        run = asyncio.run(run_conversations(convs, opts, cfg.think_time))
        out = tmp_path / "run.json"
        rc = cli.main(["--base-url", url, "--workload", "multiturn", "--turns", "2",
                       "--num-prompts", "2", "--think-time", "0", "--system-len", "20",
                       "--input-len", "4", "--output-len", "3", "--ignore-eos", "--quiet",
                       "--result-file", str(out)])
    assert [r.success for r in run.results] == [True] * 6, [r.error for r in run.results]
    by_conv = {c.conversation.index: c.conversation for c in convs}
    for r in run.results:
        conv = by_conv[r.conversation]
        answers = [x.text for x in sorted(run.results, key=lambda x: x.turn)
                   if x.conversation == r.conversation and x.turn < r.turn]
        assert r.input_len == len(tok.encode_chat(turn_messages(conv, answers, r.turn)))
    assert sorted((r.conversation, r.turn) for r in run.results) == \
        [(c, t) for c in (0, 1) for t in (1, 2, 3)]
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TTFT by turn" in printed
    data = json.loads(out.read_text())
    assert [t["turn"] for t in data["per_turn"]] == [1, 2]
    assert all(t["completed"] == 2 and t["p90_ttft_ms"] > 0 for t in data["per_turn"])
    assert data["turns"] == 2 and data["num_conversations"] == 2 and data["completed"] == 4
