"""Penalties, logit bias, min_tokens and min_p in the one sampler: each changes what it should
(against transformers' own processors where it has them), nothing at its neutral value, and
seeded sampling stays batch-independent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams, adjust_logits, sample
from pd_local.model.weights import load_model
from pd_local.tokenizer import Tokenizer


def test_each_adjustment_changes_exactly_its_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]])
    prompt, out = [1], [2, 2, 3]

    def adjusted(**kw) -> list[float]:
        return adjust_logits(logits, [SamplingParams(**kw)], [prompt], [out], [frozenset({4})])[0].tolist()

    assert adjusted(frequency_penalty=0.5) == [2.0, -1.0, -0.5, 0.5, 3.0]  # minus 0.5 x count
    assert adjusted(presence_penalty=0.5) == [2.0, -1.0, 0.0, 0.5, 3.0]  # minus 0.5 once
    assert adjusted(repetition_penalty=2.0) == [2.0, -2.0, 0.25, 0.5, 3.0]  # prompt's and output's
    assert adjusted(logit_bias_ids=(0, 4), logit_bias_values=(-100.0, 1.5)) == [-98.0, -1.0, 0.5, 1.0, 4.5]
    assert adjusted(min_tokens=4)[4] == float("-inf") and adjusted(min_tokens=3)[4] == 3.0
    neutral = SamplingParams(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, min_tokens=0)
    assert not neutral.adjusts_logits
    assert adjust_logits(logits, [neutral], [prompt], [out], [frozenset()]) is logits  # nothing copied


def test_min_p_never_draws_below_its_share_of_the_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))  # 0.12 / 0.5 = 0.24, 0.08 / 0.5 = 0.16
    draws = {p: set() for p in (0.0, 0.2)}
    for seed in range(300):
        for p in draws:
            params = SamplingParams(temperature=1.0, seed=seed, min_p=p)
            draws[p] |= set(sample(logits, [params], [params.make_generator()]))
    assert draws[0.0] == {0, 1, 2, 3} and draws[0.2] == {0, 1, 2}


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0.0), dict(min_p=1.5), dict(min_tokens=-1),
                                 dict(logit_bias_ids=(1,), logit_bias_values=())])
def test_params_refuse_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def smollm2(smollm2_f32_dir: Path):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(smollm2_f32_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()
    engine = Engine(load_model(smollm2_f32_dir, torch.float32)[0], EngineConfig(kv_cache_gb=0.2),
                    stop_token_ids=tok.stop_token_ids)
    return tok, hf, engine


def hf_greedy(hf, prompt: list[int], n: int, adjust=None, **kw) -> list[int]:
    """transformers' greedy tokens: by its generate() with its processors (kw), or by a loop of
    forward passes with `adjust(logits [V], output so far)` applied before the argmax."""
    if adjust is None:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()
    ids: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids])).logits[0, -1].float()
        ids.append(int(adjust(logits, ids).argmax()))
    return ids


@pytest.mark.slow
def test_greedy_with_each_adjustment_equals_transformers(smollm2) -> None:
    tok, hf, engine = smollm2
    prompt = tok.encode_chat([{"role": "user", "content": "Write a poem about the sea."}])
    hi = tok.encode_chat([{"role": "user", "content": "hi"}])
    n = 24

    def ours(p: list[int], **kw) -> list[int]:
        return engine.generate([p], SamplingParams(temperature=0, max_tokens=n, **kw))[0][0]

    plain = ours(prompt)
    rep = ours(prompt, repetition_penalty=1.5)
    assert rep != plain and rep == hf_greedy(hf, prompt, n, repetition_penalty=1.5)[:len(rep)]
    short = ours(hi)
    assert short[-1] in tok.stop_token_ids and len(short) < 20, "'hi' should get a short answer"
    longer = ours(hi, min_tokens=len(short) + 3)
    assert len(longer) > len(short) and longer == hf_greedy(hf, hi, len(longer), min_new_tokens=len(short) + 3)
    bias = {plain[0]: -100.0}
    biased = ours(prompt, logit_bias_ids=tuple(bias), logit_bias_values=tuple(bias.values()))
    assert biased[0] != plain[0]
    assert biased == hf_greedy(hf, prompt, n, sequence_bias={(plain[0],): -100.0})[:len(biased)]

    def freq_pres(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]) if out else 0
        return logits - 0.8 * counts - 0.6 * (counts > 0 if out else 0)

    fp = ours(prompt, frequency_penalty=0.8, presence_penalty=0.6)
    assert fp != plain and fp == hf_greedy(hf, prompt, len(fp), adjust=freq_pres)
    assert ours(prompt, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0) == plain


@pytest.mark.slow
def test_seeded_sampling_with_adjustments_is_batch_independent(smollm2) -> None:
    tok, _, engine = smollm2
    prompts = [tok.encode("Once upon a time"), tok.encode("The best way to cook rice is")]
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True, frequency_penalty=0.5,
                            repetition_penalty=1.2, min_p=0.05, logit_bias_ids=(13,), logit_bias_values=(2.0,))
    alone = engine.generate(prompts[:1], params)[0]
    together = engine.generate(prompts, params)[0]
    assert alone == together and engine.generate(prompts[:1], params)[0] == alone
