"""Chunked prefill: identical logits and tokens for every chunk size, bounded mixed steps, exact
block accounting when a chunked prefill is aborted or preempted, and the chunk planner's policies."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

import pd_local.engine.engine as engine_mod
from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.kv_cache import slots_for
from pd_local.model.attention import QUERY_TILE, AttentionMetadata, prefill_attention, write_kv
from pd_local.engine.prefill_queue import PrefillQueue
from pd_local.engine.scheduler import PrefillChunk
from pd_local.model.llama import LayerKVHook
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import SeqStatus
from tests.tiny_models import random_prompts, tiny_model

# block_size 4: these cross block boundaries at every offset, and 70/130 cross QUERY_TILE (64)
LENGTHS = [3, 4, 5, 9, 17, 33, 70, 130]
CHUNKS = [1, 7, 16, 64, None]  # None: no chunking (each prompt in one piece)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
REAL_SAMPLE = engine_mod.sample


def engine(model: torch.nn.Module, chunk: int | None, **kw: object) -> Engine:
    cfg: dict[str, object] = dict(num_blocks=256, block_size=4, max_num_seqs=16,
                                  max_prefill_tokens=chunk or 4096, chunked_prefill=chunk is not None)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def run_recording(eng: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                  monkeypatch: pytest.MonkeyPatch) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
    """Run to completion; every request's tokens and the stack of logits each was sampled from."""
    seen: dict[int, list[torch.Tensor]] = {}
    order: list[list[int]] = []

    def spy(logits, plist, gens):
        for row, rid in enumerate(order[-1]):
            seen.setdefault(rid, []).append(logits[row].clone())
        return REAL_SAMPLE(logits, plist, gens)

    real_append = eng._append_tokens

    def append(seqs, logits):
        order.append([s.req_id for s in seqs])
        return real_append(seqs, logits)

    with monkeypatch.context() as mp:  # undone on return: later engines sample for real
        mp.setattr(engine_mod, "sample", spy)
        mp.setattr(eng, "_append_tokens", append)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            eng.add_request(i, p, sp)
        toks: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        while eng.has_unfinished():
            for ev in eng.step():
                toks[ev.req_id].append(ev.token_id)
            held = sum(len(s.block_ids) for s in eng.scheduler.by_id.values())
            assert eng.num_free_blocks + held == eng.num_total_blocks
    assert eng.num_free_blocks == eng.num_total_blocks
    return toks, {rid: torch.stack(v) for rid, v in seen.items()}


# -- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_attention_rows_do_not_depend_on_the_split(dtype: torch.dtype) -> None:
    """Attention over [cached prefix (scattered blocks) + chunk] == one-shot, bit for bit."""
    torch.manual_seed(0)
    t, h, kvh, d, bs = 2 * QUERY_TILE + 37, 9, 3, 64, 16
    q, k, v = (torch.randn(t, n, d).to(dtype) for n in (h, kvh, kvh))
    table = random.Random(0).sample(range(40), 40)
    slots = torch.tensor(slots_for(table, 0, t, bs))
    kc, vc = (torch.zeros(40, bs, kvh, d, dtype=dtype) for _ in range(2))
    write_kv(kc, vc, k, v, slots)
    whole = prefill_attention(q, k, v, AttentionMetadata.prefill([t]), None, None, d**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(3, 1).transpose(0, 1),
        v.float().repeat_interleave(3, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(whole.float(), dense, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
    rng = random.Random(1)
    splits = [[c] * (t // c + 1) for c in (1, 7, 16, 64)] + [[rng.randint(1, 50) for _ in range(t)]]
    for sizes in splits:
        outs, p = [], 0
        for n in sizes:
            n = min(n, t - p)
            if n <= 0:
                break
            meta = AttentionMetadata.prefill([n], None, [p], [slots[:p] if p else None])
            outs.append(prefill_attention(q[p:p + n], k[p:p + n], v[p:p + n], meta, kc, vc, d**-0.5))
            p += n
        assert torch.equal(torch.cat(outs), whole), f"rows changed with chunks {sizes[:5]}..."


# -- engine: identical logits and tokens ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_chunk_size_gives_bit_identical_logits_and_tokens(dtype: torch.dtype, monkeypatch) -> None:
    ours = tiny_model("llama", dtype)
    prompts = random_prompts(LENGTHS, seed=11)
    runs = {}
    for chunk in CHUNKS:
        runs[chunk] = run_recording(engine(ours, chunk), prompts, GREEDY, monkeypatch)
    runs["srpf-7"] = run_recording(engine(ours, 7, prefill_policy="srpf"), prompts, GREEDY, monkeypatch)
    ref_toks, ref_logits = runs[None]
    for name, (toks, logits) in runs.items():
        assert toks == ref_toks, f"tokens differ with chunk {name}"
        for rid in ref_logits:
            assert torch.equal(logits[rid], ref_logits[rid]), f"request {rid}: logits differ with chunk {name}"


def test_seeded_sampling_is_the_same_with_any_chunk_size(monkeypatch) -> None:
    ours = tiny_model("llama")
    prompts = random_prompts([5, 17, 70], seed=12)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=10) for i in range(len(prompts))]
    got = [run_recording(engine(ours, c), prompts, params, monkeypatch)[0] for c in (None, 7, 16)]
    assert got[0] == got[1] == got[2]


def test_mixed_steps_keep_decoding_while_a_long_prompt_prefills() -> None:
    """Every step: each decoding sequence gets its token, at most max_prefill_tokens prompt
    tokens run, and a long prompt is spread over ceil(len / budget) steps."""
    ours = tiny_model("llama")
    eng = engine(ours, 16)
    short, long_ = random_prompts([5, 150], seed=13)
    eng.add_request(0, short, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [ev.req_id for ev in eng.step()] == [0]  # prefilled alone, first token
    eng.add_request(1, long_, GREEDY)
    steps = 0
    while eng.scheduler.by_id[1].status is not SeqStatus.RUNNING:
        out = eng.scheduler.schedule()
        assert [s.req_id for s in out.decode] == [0] and out.num_tokens <= 16 + 1
        eng.scheduler.advance(out)
        for seq in out.decode:
            seq.output_ids.append(1)  # stand-in token: this test is about the schedule only
        steps += 1
    assert steps == -(-150 // 16)


def test_decode_rank_lands_kv_chunk_by_chunk_from_a_prefill_engine(monkeypatch) -> None:
    """A prefill engine (add_prompt, chunks) -> write_prompt_kv(start) -> add_prefilled == colocated."""
    ours = tiny_model("llama")
    prompts = random_prompts([9, 70, 130, 4], seed=14)
    ref, _ = run_recording(engine(ours, None), prompts, GREEDY, monkeypatch)
    pre = engine(ours, 23, num_blocks=60, prefill_policy="srpf", enable_prefix_caching=False)
    dec = engine(ours, 16)
    for i, p in enumerate(prompts):
        pre.add_prompt(i, p, send_to=1)
        assert dec.reserve(i, p, GREEDY)
    first: dict[int, int] = {}

    def on_plan(chunks: list[PrefillChunk]) -> LayerKVHook:
        assert sum(c.end - c.start for c in chunks) <= 23

        def land(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for c in chunks:
                rows = slice(c.row, c.row + c.end - c.start)
                dec.write_prompt_kv(c.seq.req_id, layer, k[rows].clone(), v[rows].clone(), start=c.start)
        return land

    while pre.has_work():
        assert pre.step(on_plan) == []  # it samples nothing
        for p in pre.prompts_done:
            first[p.req_id] = dec.add_prefilled(p.req_id, p.hidden)[0].token_id
    assert pre.num_free_blocks == pre.num_total_blocks and not pre.has_unfinished()
    toks = {i: [first[i]] for i in range(len(prompts))}
    while dec.has_unfinished():
        for ev in dec.step():
            toks[ev.req_id].append(ev.token_id)
    assert toks == ref and dec.num_free_blocks == dec.num_total_blocks


# -- accounting ----------------------------------------------------------------------------

@pytest.mark.parametrize("native", [False, True], ids=["torch", "native-decode"])
def test_prompts_for_another_rank_share_a_step_with_local_sequences(native: bool) -> None:
    """An elastic rank prefills for another rank while it decodes its own: every sequence's
    seeded tokens are those of one engine running all of them (the decode rows stay on their
    kernel; it once sent every row through torch's ops then, and sampled other tokens), and the
    layer hook gets exactly the prompt rows the destination lands."""
    model = tiny_model(dtype=torch.bfloat16)
    prompts = random_prompts([9, 70, 33, 130, 17], seed=21)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=8, ignore_eos=True)
    ref = engine(model, 16, native_linear=native)
    want = {i: ids for i, (ids, _) in enumerate(ref.generate(prompts, [params] * len(prompts)))}
    mixed, dec = engine(model, 16, native_linear=native), engine(model, 16, native_linear=native)
    got: dict[int, list[int]] = {}
    for i in range(3):
        mixed.add_request(i, prompts[i], params)

    def on_plan(chunks: list[PrefillChunk]) -> LayerKVHook:
        def land(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            assert k.shape[0] == sum(c.end - c.start for c in chunks)  # prompt rows only
            for c in chunks:
                a, b = c.send_rows
                if c.seq.send_to is not None and b > a:
                    dec.write_prompt_kv(c.seq.req_id, layer, k[a:b].clone(), v[a:b].clone(), start=c.send_from)
        return land

    steps = 0
    while mixed.has_work() or dec.has_unfinished():
        if steps == 2:  # the local ones decode by now
            for i in (3, 4):
                mixed.add_prompt(i, prompts[i], send_to=1)
                assert dec.reserve(i, prompts[i], params)
        events = []
        if mixed.has_work():
            events = mixed.step(on_plan)
            for p in mixed.prompts_done:
                events += dec.add_prefilled(p.req_id, p.hidden)
        events += dec.step() if dec.has_work() else []
        for ev in events:
            got.setdefault(ev.req_id, []).append(ev.token_id)
        steps += 1
    assert got == want
    assert mixed.num_free_blocks == mixed.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks


def test_the_prefill_budget_can_change_between_steps_and_each_step_is_measured() -> None:
    """An elastic worker sets each step's prompt-token budget (its TPOT share); the engine fits
    its own step cost from the steps it ran, reported in its load."""
    eng = engine(tiny_model(), 64)
    for i, p in enumerate(random_prompts([130, 70], seed=3)):
        eng.add_request(i, p, GREEDY)
    assert not eng.load().cost.known
    sizes: list[int] = []
    for budget in (64, 8, 8, 32):
        eng.set_prefill_budget(budget)
        eng.step(lambda chunks: sizes.append(sum(c.end - c.start for c in chunks)))
    assert sizes == [64, 8, 8, 32]
    assert eng.cost.steps == 4 and eng.load().cost.known and eng.load().cost.token_ms > 0
    with pytest.raises(ValueError, match="prefill budget must be >= 1 token, got 0"):
        eng.set_prefill_budget(0)


def test_the_prefill_backlog_says_how_long_its_oldest_prompt_has_waited() -> None:
    """An elastic worker's TTFT term counts from the oldest queued prompt's arrival, not from now."""
    eng = engine(tiny_model(), 64)
    assert eng.prefill_backlog() == (0, 0, 0.0)
    eng.add_request(0, random_prompts([130], seed=4)[0], GREEDY)
    time.sleep(0.05)
    eng.add_request(1, random_prompts([20], seed=5)[0], GREEDY)
    n, tokens, waited = eng.prefill_backlog()
    assert (n, tokens) == (2, 150) and 50 <= waited < 5000
    eng.step()  # 64 tokens of the first: still queued, still the oldest
    assert eng.prefill_backlog()[1] == 86 and eng.prefill_backlog()[2] >= waited


def test_a_prefill_engine_refuses_what_it_cannot_send_and_frees_an_aborted_prompt() -> None:
    ours = tiny_model("llama")
    pre = engine(ours, 7, num_blocks=10)  # 40 tokens
    p = random_prompts([30], seed=18)[0]
    with pytest.raises(ValueError, match="skip 30 outside"):
        pre.add_prompt(0, p, send_to=1, skip=30)
    with pytest.raises(ValueError, match="prompt logprobs need every position"):
        pre.add_prompt(0, p, send_to=1, skip=4, prompt_logprobs=1)
    with pytest.raises(ValueError, match="prompt has 45 tokens"):
        pre.add_prompt(0, random_prompts([45], seed=19)[0], send_to=1)
    pre.add_prompt(0, p, send_to=1)
    pre.step()
    assert pre.num_free_blocks < pre.num_total_blocks and pre.prompts_done == []
    assert pre.abort(0) and not pre.abort(0)
    assert pre.num_free_blocks == pre.num_total_blocks and not pre.has_work()


def test_abort_in_every_phase_of_a_chunked_prefill_returns_every_block() -> None:
    ours = tiny_model("llama")
    long_ = random_prompts([61], seed=15)[0]  # 16 blocks of 4, prefilled in 9 chunks of 7
    for abort_after in range(0, 12):  # 0: still queued; 1..8: mid-prefill; 9: first token; more: decoding
        eng = engine(ours, 7, num_blocks=40)
        eng.add_request(0, random_prompts([6], seed=16)[0], SamplingParams(temperature=0, max_tokens=30))
        eng.add_request(1, long_, SamplingParams(temperature=0, max_tokens=30))
        for _ in range(abort_after):
            eng.step()
        seq = eng.scheduler.by_id[1]
        computed = eng.scheduler.queue.jobs[1].num_computed if 1 in eng.scheduler.queue else None
        assert eng.abort(1) and not eng.abort(1), f"abort after {abort_after} steps ({seq.status}, {computed})"
        assert seq.block_ids == []
        while eng.has_unfinished():
            eng.step()
        assert eng.num_free_blocks == eng.num_total_blocks, f"blocks lost aborting after {abort_after} steps"


def test_preemption_in_the_middle_of_a_chunked_prefill_frees_and_recomputes(monkeypatch) -> None:
    ours = tiny_model("llama")
    prompts = random_prompts([6, 7, 40, 5], seed=17)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref, _ = run_recording(engine(ours, None), prompts, params, monkeypatch)
    # 17 blocks of 4: the 40-token prompt (10 blocks, 8 chunks of 5) is admitted at step 3; the
    # two short ones decoding beside it need 2 blocks every 4 steps and run out at step 9.
    tight = engine(ours, 5, num_blocks=17, max_num_seqs=4)
    preempted_mid_prefill = 0
    real = tight.scheduler._preempt

    def watch(seq):
        nonlocal preempted_mid_prefill
        preempted_mid_prefill += seq.status is SeqStatus.PREFILLING
        real(seq)

    monkeypatch.setattr(tight.scheduler, "_preempt", watch)
    got, _ = run_recording(tight, prompts, params, monkeypatch)
    assert preempted_mid_prefill > 0, "the test is meant to preempt a half-prefilled sequence"
    assert got == ref


def test_a_colocated_worker_reports_each_prefill_once_when_a_decoding_sequence_is_preempted(monkeypatch) -> None:
    """The worker loop's PrefillDone (a colocated request's prefill phase, and its prefix hit)
    goes with its first token only: a sequence preempted while decoding is prefilled again,
    and that recompute must not report a second prefill (nor overwrite the hit with 0)."""
    from pd_local.cluster.dist import Role
    from pd_local.cluster.messages import PrefillDone
    from pd_local.cluster.worker import Worker

    worker = Worker.__new__(Worker)  # the step alone: no links
    worker.role, worker.kv_out, worker.started, worker.entries = Role.COLOCATED, {}, {}, []
    worker.tpot_ms, worker.lockstep = 0.0, None
    sent: list = []
    worker.to_router = type("R", (), {"send": lambda self, m: sent.append(m)})()
    worker.engine = eng = engine(tiny_model("llama"), 5, num_blocks=6, max_num_seqs=4)
    preempted: list[int] = []
    real = eng.scheduler._preempt
    monkeypatch.setattr(eng.scheduler, "_preempt", lambda s: (preempted.append(len(s.output_ids)), real(s)))
    for i, p in enumerate(random_prompts([6, 7], seed=19)):
        eng.add_request(i, p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    while eng.has_unfinished():
        worker._step()
    assert any(n > 0 for n in preempted), "the test is meant to preempt a sequence that has tokens"
    assert sorted(m.req_id for m in sent if isinstance(m, PrefillDone)) == [0, 1]

# -- the chunk planner ---------------------------------------------------------------------

def run_queue(q: PrefillQueue, arrivals: dict[int, list[tuple[str, int]]], steps: int) -> dict[str, int]:
    """Step a queue; arrivals[step] = jobs added before that step. Returns finish step per job."""
    done: dict[str, int] = {}
    for step in range(steps):
        for key, n in arrivals.get(step, []):
            q.add(key, n)
        chunks = q.plan()
        assert sum(c.num_tokens for c in chunks) <= q.budget
        for job in q.advance(chunks):
            done[job.key] = step
    return done


def test_srpf_lets_short_prompts_pass_but_never_starves_a_long_one() -> None:
    # A 2000-token prompt, then seven 40-token chats every step: more than the budget (256).
    arrivals = {0: [("long", 2000)]} | {s: [(f"short{s}.{i}", 40) for i in range(7)] for s in range(1, 100)}
    aged = run_queue(PrefillQueue(256, policy="srpf", max_passed_tokens=1024), arrivals, 100)
    assert aged["short1.0"] == 1, "a short chat should pass the long prompt at once"
    # bound: once 1024 tokens have passed it, it gets the whole budget: 2000/256 more steps
    assert "long" in aged and aged["long"] <= 1 + 1024 // 256 + 1 + 2000 // 256 + 1
    starving = run_queue(PrefillQueue(256, policy="srpf", max_passed_tokens=10**9), arrivals, 100)
    assert "long" not in starving, "without aging the long prompt should starve (the test can fail)"
    fcfs = run_queue(PrefillQueue(256, policy="fcfs"), arrivals, 100)
    assert fcfs["long"] == 2000 // 256 and fcfs["short1.0"] >= fcfs["long"]  # shorts queue behind it


def test_queue_budget_unchunked_and_errors() -> None:
    q = PrefillQueue(10, chunked=False, policy="fcfs")
    q.add("a", 30)
    q.add("b", 4)
    q.add("c", 4)
    first = q.plan()
    assert [(c.job.key, c.start, c.end) for c in first] == [("a", 0, 30)]  # alone, whole
    q.advance(first)
    assert [(c.job.key, c.end) for c in q.plan()] == [("b", 4), ("c", 4)]
    chunked = PrefillQueue(10, policy="fcfs")
    chunked.add("a", 25)
    ends = []
    while chunked:
        plan = chunked.plan()
        ends.append([(c.start, c.end, c.is_last) for c in plan])
        chunked.advance(plan)
    assert ends == [[(0, 10, False)], [(10, 20, False)], [(20, 25, True)]]
    with pytest.raises(ValueError, match="policy must be one of"):
        PrefillQueue(10, policy="lifo")
    with pytest.raises(ValueError, match="budget must be > 0"):
        PrefillQueue(0)
    chunked.add("x", 3)
    with pytest.raises(ValueError, match="already queued"):
        chunked.add("x", 3)
    with pytest.raises(ValueError, match="needs >= 1 token"):
        chunked.add("y", 0)


# -- SmolLM2 ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("which", ["f32", "bf16"])
def test_smollm2_tokens_are_identical_for_every_chunk_size(which: str, request) -> None:
    from pd_local.model.weights import load_model
    from pd_local.tokenizer import Tokenizer

    path: Path = request.getfixturevalue("smollm2_f32_dir" if which == "f32" else "smollm2_dir")
    dtype = torch.float32 if which == "f32" else torch.bfloat16
    tok = Tokenizer.from_dir(path)
    prompts = [tok.encode_chat([{"role": "user", "content": "Why is the sky blue? Explain it to a child, "
                                 "then to a physicist, in two short paragraphs. Mention Rayleigh "
                                 "scattering, the colour of sunsets and why the sky is not violet."}]),
               tok.encode_chat([{"role": "user", "content": "hi"}])]
    assert len(prompts[0]) > QUERY_TILE
    model, _ = load_model(path, dtype)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = {}
    for chunk in CHUNKS:
        eng = Engine(model, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=4,
                                         max_prefill_tokens=chunk or 4096, chunked_prefill=chunk is not None))
        got[chunk] = eng.generate(prompts, params)
        assert eng.num_free_blocks == eng.num_total_blocks
    assert all(g == got[None] for g in got.values()), got
