"""lm-eval, unchanged, against `pd-local serve` (1P1D, float32) and against its own `hf` backend
on the same weights: the shipped tasks (tests/lm_eval/) give the same scores, per sample too.
The commands are those of docs/evaluation.md."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.server_utils import serving

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="lm-eval is in the test extra (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval"


@pytest.fixture(scope="module")
def served(smollm2_f32_dir: Path) -> Iterator[str]:
    with serving(smollm2_f32_dir, "--dtype", "float32", "--prefill", "1", "--decode", "1") as s:
        yield s.url


def lm_eval(out: Path, task: str, model: str, model_args: str, *extra: str) -> tuple[dict, list[dict]]:
    """Run lm-eval's command line from the repository root (the tasks' data paths are relative
    to it); returns (the task's metrics, its logged samples by doc_id)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--include_path", str(TASKS), "--tasks", task, "--output_path", str(out), "--log_samples", *extra]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    [samples] = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    rows = sorted(map(json.loads, Path(samples).read_text().splitlines()), key=lambda r: r["doc_id"])
    return json.loads(Path(results).read_text())["results"][task], rows


def test_multiple_choice_scores_equal_the_hf_backend(served: str, smollm2_f32_dir: Path, tmp_path: Path) -> None:
    """loglikelihood requests through local-completions, batch_size 8 (lists of token-id
    prompts, echo, logprobs 1, max_tokens 1): the same accuracy as transformers, each choice's
    loglikelihood within 1e-4 and the same is_greedy."""
    ours, ours_rows = lm_eval(tmp_path / "ours", "pd_local_mc", "local-completions",
                              f"model={smollm2_f32_dir.name},base_url={served}/v1/completions,"
                              f"tokenizer_backend=huggingface,tokenizer={smollm2_f32_dir},"
                              "num_concurrent=1,max_retries=1", "--batch_size", "8")
    ref, ref_rows = lm_eval(tmp_path / "hf", "pd_local_mc", "hf",
                            f"pretrained={smollm2_f32_dir},dtype=float32", "--batch_size", "8")
    assert ours["acc,none"] == ref["acc,none"] and ours["acc_norm,none"] == ref["acc_norm,none"]
    assert 0 < ref["acc,none"] < 1, "a task every model aces (or fails) compares nothing"
    assert len(ours_rows) == len(ref_rows) == 24
    for a, b in zip(ours_rows, ref_rows):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert abs(float(ll_a) - float(ll_b)) < 1e-4 and greedy_a == greedy_b, (a["doc"], ll_a, ll_b)


def test_generation_scores_equal_the_hf_backend(served: str, smollm2_f32_dir: Path, tmp_path: Path) -> None:
    """generate_until through local-chat-completions (the chat template on the server) against
    hf with --apply_chat_template: the same greedy answers, so the same score."""
    ours, ours_rows = lm_eval(tmp_path / "ours", "pd_local_gen", "local-chat-completions",
                              f"model={smollm2_f32_dir.name},base_url={served}/v1/chat/completions,"
                              "num_concurrent=1,max_retries=1", "--apply_chat_template")
    ref, ref_rows = lm_eval(tmp_path / "hf", "pd_local_gen", "hf",
                            f"pretrained={smollm2_f32_dir},dtype=float32", "--apply_chat_template")
    assert [r["resps"] for r in ours_rows] == [r["resps"] for r in ref_rows]
    assert ours["exact_match,last-word"] == ref["exact_match,last-word"] > 0
