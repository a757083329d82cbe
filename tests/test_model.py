"""The model against transformers, and paged decode attention against dense attention."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pd_local.engine.kv_cache import slots_for
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.attention import AttentionMetadata
from pd_local.model.config import ModelConfig, ModelConfigError
from tests.tiny_models import hf_tiny, ours_from_hf, random_prompts

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "arch,extra",
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"rope_scaling": LLAMA3_SCALING})],
    ids=["llama", "mistral", "qwen2", "qwen3", "llama3-rope"],
)
def test_prefill_logits_match_transformers(arch: str, extra: dict) -> None:
    hf = hf_tiny(arch, tie=arch != "qwen2", **extra)
    ours = ours_from_hf(hf)
    prompts = random_prompts([9, 23, 200])
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for n in lens for i in range(n)])
    logits = ours.compute_logits(ours(ids, pos, AttentionMetadata.prefill(lens)))
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        got = logits[start:start + len(p)]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        start += len(p)


def test_paged_decode_equals_dense_attention() -> None:
    """Decode each sequence token by token through scattered (non-contiguous) blocks; the
    logits must equal a dense causal forward over the whole sequence."""
    torch.manual_seed(0)
    hf = hf_tiny("llama")
    ours = ours_from_hf(hf)
    mc = ours.config
    bs = 4
    cache = PagedKVCache(mc.num_layers, 64, bs, mc.num_kv_heads, mc.head_dim, torch.float32, "cpu")
    prompts = random_prompts([7, 13])
    tables = [[5, 60, 2, 33, 17, 40], [9, 1, 50, 22, 3, 44, 31]]  # deliberately scattered
    extra = 6
    conts = random_prompts([extra, extra], seed=3)
    # prefill both into the cache
    lens = [len(p) for p in prompts]
    slots = [s for p, t in zip(prompts, tables) for s in slots_for(t, 0, len(p), bs)]
    ids = torch.tensor([x for p in prompts for x in p])
    pos = torch.tensor([i for n in lens for i in range(n)])
    ours(ids, pos, AttentionMetadata.prefill(lens, torch.tensor(slots)), cache)
    seqs = [list(p) for p in prompts]
    for step in range(extra):
        toks = [c[step] for c in conts]
        ctx = [len(s) + 1 for s in seqs]
        meta = AttentionMetadata.decode(
            [t[: (n + bs - 1) // bs] for t, n in zip(tables, ctx)], ctx,
            [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, ctx)], bs,
        )
        h = ours(torch.tensor(toks), torch.tensor([n - 1 for n in ctx]), meta, cache)
        got = ours.compute_logits(h)
        for i, s in enumerate(seqs):
            s.append(toks[i])
            dense = ours.compute_logits(
                ours(torch.tensor(s), torch.arange(len(s)), AttentionMetadata.prefill([len(s)]))
            )[-1]
            torch.testing.assert_close(got[i], dense, atol=1e-5, rtol=1e-5)


def test_layer_hook_sees_every_layer_in_order_with_all_tokens() -> None:
    ours = ours_from_hf(hf_tiny("llama"))
    seen: list[tuple[int, tuple[int, ...]]] = []
    ours(torch.arange(10), torch.arange(10), AttentionMetadata.prefill([4, 6]),
         on_layer_kv=lambda i, k, v: seen.append((i, tuple(k.shape))))
    assert seen == [(i, (10, 2, 16)) for i in range(3)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: untied lm_head, q/k/v bias
def test_exact_mode_keeps_one_copy_of_each_linear_weight(arch: str) -> None:
    """set_batch_invariant(True) on an fp32 CPU model replaces every Linear's weight by its
    packed copy (no plain copy left beside it) without changing a logit; False gives the plain
    weights back bit for bit, and packing again is still exact."""
    from pd_local.model.layers import Linear, onednn_packing

    if not onednn_packing():
        pytest.skip("this CPU/torch uses the padding rule: nothing is packed")
    ours = ours_from_hf(hf_tiny(arch, tie=arch != "qwen2"))
    linears = [m for m in ours.modules() if isinstance(m, Linear)]
    plain = [m.weight.detach().clone() for m in linears]
    prompts = random_prompts([9, 23])
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    meta = AttentionMetadata.prefill([len(p) for p in prompts])
    before = ours.compute_logits(ours(ids, pos, meta))
    ours.set_batch_invariant(True)
    assert all(m.weight.is_mkldnn and m.packed._packed is None for m in linears)
    assert (ours.lm_head is not None) == (arch == "qwen2")
    assert torch.equal(ours.compute_logits(ours(ids, pos, meta)), before)
    ours.set_batch_invariant(False)
    assert all(not m.weight.is_mkldnn and torch.equal(m.weight, w) for m, w in zip(linears, plain))
    ours.set_batch_invariant(True)
    assert torch.equal(ours.compute_logits(ours(ids, pos, meta)), before)


@pytest.mark.slow
def test_exact_mode_frees_the_plain_weights_of_smollm2(smollm2_dir) -> None:
    """The point of packing in place: a serving rank's resident memory drops by (nearly) the
    plain linears' bytes, ~425 MB for SmolLM2-135M in fp32, instead of holding both copies."""
    from pd_local.model.layers import Linear, onednn_packing
    from pd_local.model.weights import load_model

    if not onednn_packing():
        pytest.skip("this CPU/torch uses the padding rule: nothing is packed")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    model, _ = load_model(smollm2_dir, torch.float32)
    plain_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    ids = torch.arange(10, 42)
    model(ids, ids - 10, AttentionMetadata.prefill([32]))  # lazily packed: both copies resident
    both = rss()
    model.set_batch_invariant(True)
    freed = both - rss()
    assert freed > 0.8 * plain_bytes, f"freed {freed / 2**20:.0f} MB of {plain_bytes / 2**20:.0f} MB"


def test_rows_do_not_depend_on_batch_size_fp32() -> None:
    """Batch invariance: a decode row's logits are bit-identical alone or among 1..12 others."""
    ours = ours_from_hf(hf_tiny("llama"))
    x = torch.randn(13, 64)
    from pd_local.model.layers import linear

    w = ours.model.layers[0].mlp.down_proj.weight[:, :64]
    full = linear(x, w)
    for m in range(1, 13):
        assert torch.equal(linear(x[:m], w), full[:m]), f"rows differ at batch {m}"


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    """Run the test body with torch's intra-op thread count set to request.param."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_rows_hold_at_real_shapes_on_this_cpu(dtype: torch.dtype, threads: int) -> None:
    """layers.linear's invariance (oneDNN's packed fp32 kernel, or the padding rule) was measured
    on one CPU; this checks it on the CPU running the tests, with 1 and 2 threads, at SmolLM2-135M's
    projection and lm_head shapes (kernels are picked by shape, so tiny test models alone would
    not catch a miss), for decode batch sizes and for prefill-sized M."""
    from pd_local.model.layers import PackedWeight, linear

    g = torch.Generator().manual_seed(0)
    ms = (1, 2, 3, 4, 5, 7, 8, 11, 12, 16, 33, 64) + ((65, 200, 512) if dtype == torch.float32 else ())
    for out_f, in_f in [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]:
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        x = torch.randn(max(ms) + 1, in_f, generator=g).to(dtype)
        packed = PackedWeight()
        full = linear(x, w, packed=packed)
        for m in ms:
            assert torch.equal(linear(x[:m], w, packed=packed), full[:m]), f"{out_f}x{in_f}: rows differ at M={m}"


def test_importing_layers_probes_nothing_and_the_probe_keeps_the_thread_count() -> None:
    """The oneDNN probe runs matmuls and switches thread counts: at first use, not at import,
    and torch's thread count is the same after it as before."""
    code = ("import torch; torch.set_num_threads(3)\n"
            "from pd_local.model import layers\n"
            "assert layers.onednn_packing.cache_info().currsize == 0, 'probed at import'\n"
            "layers.onednn_packing()\n"
            "assert layers.onednn_packing.cache_info().currsize == 1\n"
            "assert torch.get_num_threads() == 3, torch.get_num_threads()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_packing_probe_refuses_a_kernel_whose_rows_depend_on_the_batch(monkeypatch) -> None:
    """On a CPU kind where oneDNN's packed kernel is not M-invariant (unmeasured: AVX-512), the
    probe must say so, so that `linear` pads instead of losing exactness."""
    from pd_local.model import layers

    if not layers.onednn_packing():
        pytest.skip("this CPU already uses the padding rule (no oneDNN packing, or the probe refused it)")
    assert layers._rows_invariant()
    real = torch.ops.mkldnn._linear_pointwise

    def by_batch(x, w, b, *rest):  # a kernel that rounds differently when M is odd
        y = real(x, w, b, *rest)
        return y * (1 + 1e-6) if x.shape[0] % 2 else y

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", by_batch)
    assert not layers._rows_invariant()


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16)], ids=["smollm2", "tiny"])
def test_decode_attention_rows_do_not_depend_on_the_batch_with_threads(
    dtype: torch.dtype, threads: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    """A decode row's attention output is bit-identical alone and in batches of 2..16, for
    contexts below, at and past the flash kernel's 512-key split, with more than one thread
    (the CPU flash kernel's per-thread scratch alignment once made it depend on the batch)."""
    from pd_local.model.attention import paged_decode_attention

    g = torch.Generator().manual_seed(1)
    bs, nb = 16, 300
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    for ctx in (1, 15, 16, 17, 150, 512, 513, 1100):
        n = 16
        nblk = -(-ctx // bs)
        tables = torch.randint(0, nb, (n, nblk), generator=g).tolist()  # scattered, may share blocks
        lens = [ctx - (i % 3) if ctx > 3 else ctx for i in range(n)]  # same block count or one fewer
        q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
        meta = AttentionMetadata.decode([t[: -(-c // bs)] for t, c in zip(tables, lens)], lens, [0] * n, bs)
        full = paged_decode_attention(q, kc, vc, meta, head_dim**-0.5)
        for b in (1, 2, 5, 11):
            sub = AttentionMetadata.decode([t[: -(-c // bs)] for t, c in zip(tables[:b], lens[:b])], lens[:b], [0] * b, bs)
            got = paged_decode_attention(q[:b], kc, vc, sub, head_dim**-0.5)
            assert torch.equal(got, full[:b]), f"context {ctx}: rows differ at batch {b}"


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_in_calls_of_fewer_rows_gives_the_same_rows(
    dtype: torch.dtype, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long contexts split a block-count group into calls of DECODE_GATHER_BYTES of gathered
    K/V: every split (one row a call, three, the whole group) gives bit-identical rows, with one
    group and with several (rows of different block counts, interleaved)."""
    from pd_local.model import attention

    g = torch.Generator().manual_seed(3)
    bs, nb, kvh, d, h = 16, 200, 3, 64, 9
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kvh, d, generator=g).to(dtype)
    calls: list[int] = []
    real = attention._decode_group

    def counted(q, *args):  # noqa: ANN001, ANN202 - a spy on the real function
        calls.append(q.shape[0])
        return real(q, *args)

    monkeypatch.setattr(attention, "_decode_group", counted)
    for lens in ([300] * 7, [300, 40, 290, 45, 300, 33, 280]):
        n = len(lens)
        tables = [torch.randint(0, nb, (-(-c // bs),), generator=g).tolist() for c in lens]
        q = torch.randn(n, h, d, generator=g).to(dtype)
        meta = AttentionMetadata.decode(tables, lens, [0] * n, bs)
        per_row = 2 * 304 * kvh * d * kc.element_size()  # a 300-token row's gathered K + V
        outs = {}
        for rows_per_call in (1, 3, 100):
            monkeypatch.setattr(attention, "DECODE_GATHER_BYTES", per_row * rows_per_call)
            calls.clear()
            outs[rows_per_call] = attention.paged_decode_attention(q, kc, vc, meta, d**-0.5)
            if rows_per_call == 1:
                long_rows = sum(c >= 200 for c in lens)  # these go one by one; short ones share
                assert calls.count(1) >= long_rows and len(calls) < n + 1, calls
        assert torch.equal(outs[1], outs[100]) and torch.equal(outs[3], outs[100]), lens


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8,
                               "num_attention_heads": 2, "num_hidden_layers": 1,
                               "intermediate_size": 8, "vocab_size": 8})


def test_config_errors_name_the_field() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8}
    with pytest.raises(ModelConfigError, match="missing required field 'vocab_size'"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(ModelConfigError, match=r"num_attention_heads \(4\) must be a multiple"):
        ModelConfig.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(ModelConfigError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ModelConfigError, match="no 'architectures'"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "architectures"})


def test_config_reads_transformers5_rope_parameters() -> None:
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                 "num_attention_heads": 4, "num_hidden_layers": 1,
                                 "intermediate_size": 8, "vocab_size": 8,
                                 "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
