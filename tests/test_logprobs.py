"""Logprobs in the engine: the sampled tokens' and the prompt's, against transformers (float32)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig, ServeConfig
from pd_local.engine.engine import Engine, TokenEvent
from pd_local.engine.logprobs import Logprob, logprobs_of
from pd_local.engine.sampling import SamplingParams
from pd_local.model.weights import load_model
from pd_local.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog. Then it ran to the river and"
TOL = 1e-4


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[int, list[TokenEvent]]:
    """Every event of each prompt, all in flight at once."""
    events: dict[int, list[TokenEvent]] = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.req_id].append(ev)
    assert engine.num_free_blocks == engine.num_total_blocks
    return events


@pytest.fixture(scope="module")
def smollm2(smollm2_f32_dir: Path):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(smollm2_f32_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()
    return tok, load_model(smollm2_f32_dir, torch.float32)[0], hf


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ids: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_of_picks_the_target_and_the_top_k() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    a, b = logprobs_of(logits, [2, 1], 2)
    ref = torch.log_softmax(logits, -1)
    assert a.token_id == 2 and a.logprob == pytest.approx(ref[0, 2].item())
    assert a.top_ids == (1, 2) and a.top_logprobs == pytest.approx(ref[0, [1, 2]].tolist())
    assert b.top_ids[0] == 0 and len(b.top_ids) == 2
    assert logprobs_of(logits, [3, 0], 0) == [Logprob(3, pytest.approx(ref[0, 3].item())),
                                              Logprob(0, pytest.approx(ref[1, 0].item()))]


@pytest.mark.parametrize("bad", [-1, 21])
def test_params_refuse_a_top_count_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="logprobs must be None or in"):
        SamplingParams(logprobs=bad)
    with pytest.raises(ValueError, match="prompt_logprobs must be None or in"):
        SamplingParams(prompt_logprobs=bad)


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True], ids=["torch-linear", "native-linear"])
def test_sampled_and_prompt_logprobs_equal_transformers(smollm2, native: bool) -> None:
    """Greedy: every token's top entry is itself, and its logprob and top 5 equal transformers'
    log-softmax; the prompt's logprobs too, across chunk boundaries (max_prefill_tokens 7) and
    with the prefix cache on and holding the prompt already (such a request takes none of it)."""
    tok, model, hf = smollm2
    prompt = tok.encode(PROMPT)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.2, max_prefill_tokens=7, native_linear=native,
                                        enable_prefix_caching=True),
                    stop_token_ids=tok.stop_token_ids)
    plain = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert all(ev.logprob is None and ev.prompt_logprobs == () for ev in plain)
    hits = engine.prefix_hit_tokens
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    events = run(engine, [prompt], params)[0]
    assert engine.prefix_hit_tokens == hits, "a prompt-logprobs request took cached blocks"
    out = [ev.token_id for ev in events]
    assert out == [ev.token_id for ev in plain]
    ref = hf_logprobs(hf, prompt + out)  # [P + 6, V]
    n = len(prompt)
    for i, ev in enumerate(events):
        lp, row = ev.logprob, ref[n - 1 + i]
        assert lp is not None and lp.token_id == ev.token_id == lp.top_ids[0]
        assert abs(lp.logprob - row[ev.token_id].item()) < TOL
        assert lp.top_ids == tuple(torch.topk(row, 5).indices.tolist())
        assert max(abs(a - b) for a, b in zip(lp.top_logprobs, torch.topk(row, 5).values.tolist())) < TOL
    plp = events[0].prompt_logprobs
    assert [p.token_id for p in plp] == prompt[1:]
    assert all(ev.prompt_logprobs == () for ev in events[1:])
    got = torch.tensor([p.logprob for p in plp])
    want = ref[torch.arange(n - 1), torch.tensor(prompt[1:])]
    assert (got - want).abs().max().item() < TOL
    assert all(p.top_ids == tuple(torch.topk(ref[i], 3).indices.tolist()) for i, p in enumerate(plp))


@pytest.mark.slow
def test_logprobs_do_not_depend_on_the_batch(smollm2) -> None:
    """A request's logprobs are the same alone and beside others (batch-invariant kernels)."""
    tok, model, _ = smollm2
    prompts = [tok.encode(PROMPT), tok.encode("Hello"), tok.encode("1, 2, 3, 4,")]
    engine = Engine(model, EngineConfig(kv_cache_gb=0.2), stop_token_ids=tok.stop_token_ids)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    alone = run(engine, prompts[:1], params)[0]
    together = run(engine, prompts, params)[0]
    assert [ev.logprob for ev in alone] == [ev.logprob for ev in together]
    assert alone[0].prompt_logprobs == together[0].prompt_logprobs
    assert all(p.top_ids == () for p in alone[0].prompt_logprobs)


def test_router_holds_a_pd_requests_outputs_until_its_prompt_logprobs_come() -> None:
    """PD: the decode rank's tokens (even the last) can reach the router before the prefill
    rank's PromptLogprobs; the client still gets them on its first output, then the rest in
    order, and the finish last. An abort meanwhile ends it at once."""
    import asyncio

    from pd_local.api.backend import BackendStats
    from pd_local.engine.events import Load
    from pd_local.cluster.messages import FinishReason, PromptLogprobs, TokenEntry, Tokens
    from pd_local.cluster.migration import Mover
    from pd_local.cluster.router import Router
    from pd_local.cluster.router_state import RankState, RequestState

    router = Router.__new__(Router)  # the routing state alone: no threads, no links
    router.colocated, router.elastic, router.decode, router.requests, router.kv = False, False, {2: RankState(2, "decode")}, {}, BackendStats()
    router._prefill_tokens = {}
    router.ctx = types.SimpleNamespace(cfg=ServeConfig())  # Mover reads the [modes] times
    router.mover = Mover(router)
    got: list = []
    router._deliver = lambda req, out: got.append(out)  # type: ignore[method-assign]
    prompt = (Logprob(7, -1.5), Logprob(8, -0.25))

    def request(req_id: int) -> RequestState:
        req = RequestState(req_id, (5, 7, 8), SamplingParams(prompt_logprobs=0), asyncio.Queue(), 2)
        router.requests[req_id] = req
        router.decode[2].unfinished += 1
        return req

    def tokens(*entries: TokenEntry) -> Tokens:
        return Tokens(entries, Load(), 0.0)

    request(1)
    router._tokens(2, tokens(TokenEntry(1, 40)))
    router._tokens(2, tokens(TokenEntry(1, 41, True, FinishReason.LENGTH)))
    assert got == [] and 1 in router.requests
    router._prompt_logprobs(PromptLogprobs(1, prompt))
    assert [o.token_ids for o in got] == [[40], [41]] and [o.finished for o in got] == [False, True]
    assert got[0].prompt_logprobs == prompt and got[1].prompt_logprobs is None
    assert got[1].finish_reason == "length" and not router.requests and router.decode[2].unfinished == 0

    got.clear()
    request(2)
    router._prompt_logprobs(PromptLogprobs(2, ()))  # a one-token prompt's: empty, but here
    router._tokens(2, tokens(TokenEntry(2, 40, True, FinishReason.STOP)))
    assert len(got) == 1 and got[0].prompt_logprobs == () and got[0].finished

    got.clear()
    req = request(3)
    router._tokens(2, tokens(TokenEntry(3, 40, True, FinishReason.STOP)))
    router.to_worker = {2: type("S", (), {"send": lambda self, m: None})()}
    router._abort(req, "abort")
    assert [o.finish_reason for o in got] == ["abort"] and not router.requests
    router._prompt_logprobs(PromptLogprobs(3, prompt))  # late: dropped
    assert len(got) == 1
