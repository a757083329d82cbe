"""The real default model: our batched engine vs transformers, token for token (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.model.weights import load_model
from pd_local.engine.sampling import SamplingParams
from pd_local.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Explain TCP in one paragraph."}],
    [{"role": "user", "content": "Write a Python function that reverses a linked list."}],
    [{"role": "user", "content": "2+2=? And 17*23=?"}],
    [{"role": "user", "content": "Traduis en français : the cat sleeps on the warm windowsill."}],
    [{"role": "user", "content": "List five prime numbers and say why each is prime."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke about compilers."}],
    [{"role": "user", "content": "Summarise the plot of Hamlet in three sentences, then give one quote. " * 3}],
    [{"role": "user", "content": "日本の首都はどこですか？ Answer in English and Japanese. 🙂"}],
]
NEW_TOKENS = 64


def native_calls(monkeypatch) -> list[int]:
    """Rows per call of the native decode kernels (linear and whole layer) from now on (spies:
    the real kernels run)."""
    from pd_local.model.native_linear import NativeLinear

    calls: list[int] = []
    real = NativeLinear.__call__

    def spy(self, x, weight, bias=None, panel=None):
        calls.append(x.shape[0])
        return real(self, x, weight, bias, panel)

    monkeypatch.setattr(NativeLinear, "__call__", spy)
    real_layer = NativeLinear.decode_layer

    def layer_spy(self, spec, x, *args):
        calls.append(x.shape[0])
        return real_layer(self, spec, x, *args)

    monkeypatch.setattr(NativeLinear, "decode_layer", layer_spy)
    return calls


@pytest.mark.parametrize("native", [False, True], ids=["torch-linear", "native-linear"])
def test_batched_engine_matches_transformers_on_smollm2(smollm2_f32_dir: Path, native: bool, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(smollm2_f32_dir)
    prompts = [tok.encode_chat(c) for c in CHATS]
    assert len(set(map(len, prompts))) > 5, "prompts should have varied lengths"
    model, _ = load_model(smollm2_f32_dir, torch.float32)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.5, max_num_seqs=16, native_linear=native),
                    stop_token_ids=tok.stop_token_ids)
    calls = native_calls(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = engine.generate(prompts, params)  # all in flight at once
    assert engine.num_free_blocks == engine.num_total_blocks
    if native and not calls:
        pytest.skip("the native kernel did not run here (unavailable, or fp32 weights packed for oneDNN)")
    assert bool(calls) == native

    hf = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()
    mismatches = []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        if ours[i][0] != ref:
            first = next(j for j, (a, b) in enumerate(zip(ours[i][0], ref)) if a != b)
            mismatches.append((i, first, tok.decode(ref)))
    assert not mismatches, f"(prompt, first differing position, reference text): {mismatches}"
