"""CUDA-graph decode: bucket choice, padded static inputs and the runner, on CPU and CUDA.

On CPU the runner executes the padded batch eagerly (no graph), which is the same inputs,
padding and sink block as a replay; the `gpu` tests capture and replay for real.
"""

from __future__ import annotations

import pytest
import torch

from pd_local.config import ConfigError, load_config
from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.model.attention import AttentionMetadata
from pd_local.model.cuda_graphs import (
    DecodeBatch,
    DecodeGraphRunner,
    StaticDecodeInputs,
    graph_buckets,
    pick_bucket,
)
from pd_local.engine.sampling import SamplingParams
from tests.tiny_models import random_prompts, tiny_model


@pytest.mark.parametrize("max_num_seqs, want", [
    (1, (1,)),
    (5, (1, 2, 4, 5)),
    (8, (1, 2, 4, 8)),
    (40, (1, 2, 4, 8, 16, 32, 40)),
    (64, (1, 2, 4, 8, 16, 32, 48, 64)),
])
def test_buckets(max_num_seqs: int, want: tuple[int, ...]) -> None:
    assert graph_buckets(max_num_seqs) == want


def test_buckets_up_to_256_and_bad_sizes() -> None:
    b = graph_buckets(256)
    assert b[:5] == (1, 2, 4, 8, 16) and b[-1] == 256 and len(b) == 4 + 16
    assert all(y - x == 16 for x, y in zip(b[4:], b[5:]))
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        graph_buckets(0)


@pytest.mark.parametrize("batch, want", [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (16, 16),
                                         (17, 32), (33, 48), (64, 64), (65, None)])
def test_pick_bucket(batch: int, want: int | None) -> None:
    assert pick_bucket(batch, graph_buckets(64)) == want


def test_pick_bucket_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="got 0"):
        pick_bucket(0, (1, 2))


def test_fill_lays_out_real_rows_then_padding() -> None:
    s = StaticDecodeInputs(rows=8, width=4, sink_block=9, block_size=16, device=torch.device("cpu"))
    batch = DecodeBatch(token_ids=[5, 6, 7], positions=[0, 20, 40], slots=[32, 84, 104],
                        block_tables=[[2], [3, 5], [1, 6, 4]], context_lens=[1, 21, 41])
    s.fill(batch, 4)
    assert s.ids(4).tolist() == [5, 6, 7, 0]
    assert s.positions(4).tolist() == [0, 20, 40, 0]
    meta = s.meta(4)
    assert meta.slot_mapping.tolist() == [32, 84, 104, 9 * 16]  # padding writes to the sink
    assert meta.context_lens.tolist() == [1, 21, 41, 1]
    assert meta.block_tables.tolist() == [[2, 9, 9, 9], [3, 5, 9, 9], [1, 6, 4, 9], [9, 9, 9, 9]]
    assert meta.decode_groups == () and meta.num_decode == 4
    assert meta.seq_lens == ()  # no prefill chunks
    # a smaller batch later overwrites every row it uses: no stale row survives
    s.fill(DecodeBatch([8], [3], [50], [[3]], [4]), 2)
    assert s.ids(2).tolist() == [8, 0] and s.meta(2).block_tables.tolist() == [[3, 9, 9, 9], [9] * 4]
    # views of one buffer: the graphs read fixed addresses
    assert s.meta(4).block_tables.data_ptr() == s.meta(2).block_tables.data_ptr()


def test_fill_refuses_what_does_not_fit() -> None:
    s = StaticDecodeInputs(rows=4, width=2, sink_block=0, block_size=16, device=torch.device("cpu"))
    one = DecodeBatch([1], [0], [16], [[1]], [1])
    with pytest.raises(ValueError, match="1 rows do not fit a bucket of 8"):
        s.fill(one, 8)
    with pytest.raises(ValueError, match="block table of 3 blocks, buffers hold 2"):
        s.fill(DecodeBatch([1], [0], [16], [[1, 2, 3]], [40]), 1)


def _engine(max_num_seqs: int, graphs: bool) -> Engine:
    """A tiny fp32 engine; with graphs, a runner (eager on CPU) whose sink is a block taken
    from the allocator, so the test can see it is the only extra block ever written."""
    model = tiny_model()
    engine = Engine(model, EngineConfig(num_blocks=96, block_size=4, max_num_seqs=max_num_seqs,
                                        max_model_len=128))
    assert engine.graphs is None  # cuda_graphs is ignored on CPU
    if graphs:
        sink = engine.allocator.allocate(1)[0]
        engine.graphs = DecodeGraphRunner(model, engine.kv_cache, max_num_seqs, 128 // 4, sink, "cpu")
    return engine


def test_runner_step_equals_eager_step_and_touches_only_real_slots_and_the_sink() -> None:
    model = tiny_model()
    cfg = model.config
    from pd_local.model.kv_cache import PagedKVCache

    def cache() -> PagedKVCache:
        c = PagedKVCache(cfg.num_layers, 24, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
        g = torch.Generator().manual_seed(7)
        for t in c.k + c.v:
            t.copy_(torch.randn(t.shape, generator=g))
        return c

    eager, graphed = cache(), cache()
    runner = DecodeGraphRunner(model, graphed, max_num_seqs=8, max_blocks_per_seq=6,
                               sink_block=23, device="cpu")
    tables = [[3, 10, 1], [7], [20, 2, 4, 5, 11]]  # scattered, of different lengths
    ctx = [10, 2, 19]
    slots = [t[(n - 1) // 4] * 4 + (n - 1) % 4 for t, n in zip(tables, ctx)]
    batch = DecodeBatch([11, 12, 13], [n - 1 for n in ctx], slots, tables, ctx)
    got = runner.run(batch)  # bucket 4: one padded row
    meta = AttentionMetadata.decode(tables, ctx, slots, 4)
    want = model.compute_logits(model(torch.tensor(batch.token_ids), torch.tensor(batch.positions),
                                      meta, eager))
    assert got.shape == want.shape == (3, cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.k + eager.v, graphed.k + graphed.v):
        torch.testing.assert_close(a[:23], b[:23], rtol=1e-5, atol=1e-6)  # only real slots moved
    assert not torch.equal(graphed.k[0][23], eager.k[0][23])  # the padding row wrote the sink
    nine = DecodeBatch([1] * 9, [0] * 9, [0] * 9, [[0]] * 9, [1] * 9)
    assert runner.run(nine) is None  # beyond the largest bucket (8): the caller runs eagerly


@pytest.mark.parametrize("n_prompts, max_num_seqs", [(3, 8), (7, 20), (6, 4)],
                         ids=["bucket4", "bucket8", "more-prompts-than-seqs"])
def test_engine_with_runner_gives_the_same_greedy_tokens(n_prompts: int, max_num_seqs: int) -> None:
    prompts = random_prompts([3 + 5 * i for i in range(n_prompts)], seed=n_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = _engine(max_num_seqs, graphs=False).generate(prompts, params)
    engine = _engine(max_num_seqs, graphs=True)
    assert engine.generate(prompts, params) == want
    assert engine.num_free_blocks == engine.num_total_blocks - 1  # all freed; the sink stays


def test_config_cuda_graphs() -> None:
    assert load_config(None).engine.cuda_graphs is True
    assert load_config(None, {"engine.cuda_graphs": False}).engine.cuda_graphs is False
    with pytest.raises(ConfigError, match="engine.cuda_graphs must be true or false, got 1"):
        load_config(None, {"engine.cuda_graphs": 1})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replayed_graphs_equal_the_eager_model_on_cuda() -> None:
    """Capture, then replay three batches (buckets 1, 4, 16) with new contexts each time: the
    static buffers are refilled and the logits match the eager forward."""
    from pd_local.model.kv_cache import PagedKVCache

    model = tiny_model().to("cuda")
    cfg = model.config
    caches = []
    for _ in range(2):
        c = PagedKVCache(cfg.num_layers, 65, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cuda")
        g = torch.Generator(device="cuda").manual_seed(5)
        for t in c.k + c.v:
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        caches.append(c)
    eager, graphed = caches
    runner = DecodeGraphRunner(model, graphed, max_num_seqs=16, max_blocks_per_seq=8,
                               sink_block=64, device="cuda")
    runner.capture()
    assert sorted(runner.graphs) == [1, 2, 4, 8, 16]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    for rows in (1, 3, 16):
        ctx = [1 + (37 * i + 11 * rows) % 64 for i in range(rows)]  # <= 4 blocks each
        tables = [perm[4 * i:4 * i + (n + 15) // 16] for i, n in enumerate(ctx)]  # disjoint
        slots = [t[(n - 1) // 16] * 16 + (n - 1) % 16 for t, n in zip(tables, ctx)]
        batch = DecodeBatch([7 + i for i in range(rows)], [n - 1 for n in ctx], slots, tables, ctx)
        got = runner.run(batch).clone()
        meta = AttentionMetadata.decode(tables, ctx, slots, 16, "cuda")
        want = model.compute_logits(model(torch.tensor(batch.token_ids, device="cuda"),
                                          torch.tensor(batch.positions, device="cuda"), meta, eager))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_prompts", [1, 3, 16, 40])  # buckets 1, 4, 16; 40: 32 at a time
def test_cuda_graph_engine_equals_eager_engine_fp32(n_prompts: int) -> None:
    prompts = random_prompts([3 + 7 * i for i in range(n_prompts)], seed=n_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        model = tiny_model().to("cuda")
        # peakier logits (tied embeddings x10): greedy must not hinge on 1e-7 near-ties, since
        # cuBLAS may round a bucket of 4 rows differently from a batch of 3
        model.model.embed_tokens.weight.data.mul_(10.0)
        engine = Engine(model, EngineConfig(num_blocks=512, max_num_seqs=32, max_model_len=512,
                                            cuda_graphs=graphs), device="cuda")
        assert (engine.graphs is not None) == graphs
        outs.append(engine.generate(prompts, params))
        assert engine.num_free_blocks == engine.num_total_blocks
    assert outs[0] == outs[1]
