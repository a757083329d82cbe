"""The native whole-layer decode kernel (model/native_decode.py): as accurate as torch's ops
against fp64, rows identical at every batch, thread count and beside prefill rows, and models it
cannot run keep the per-linear path."""

from __future__ import annotations

import logging

import pytest
import torch

from pd_local.engine.kv_cache import slots_for
from pd_local.model.attention import AttentionMetadata
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.native_decode import DecodeLayers, why_not
from tests.tiny_models import hf_tiny, ours_from_hf, random_prompts

BS = 16
LENS = [3, 64, 65, 150, 20]  # contexts across softmax chunks (64 keys) and blocks


def tiny(dtype: torch.dtype):
    """3 query heads per KV head, as SmolLM2; head_dim 32."""
    hf = hf_tiny("llama", hidden_size=192, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)
    return ours_from_hf(hf, dtype)


def prefilled(model, dtype: torch.dtype) -> tuple[PagedKVCache, list[list[int]]]:
    """A cache holding LENS-token prompts in scattered blocks, filled by torch's prefill path."""
    mc = model.config
    cache = PagedKVCache(mc.num_layers, 64, BS, mc.num_kv_heads, mc.head_dim, dtype, "cpu")
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[i * 12:(i + 1) * 12] for i in range(len(LENS))]
    prompts = random_prompts(LENS)
    slots = [s for p, t in zip(prompts, tables) for s in slots_for(t, 0, len(p), BS)]
    model(torch.tensor([x for p in prompts for x in p]), torch.tensor([i for n in LENS for i in range(n)]),
          AttentionMetadata.prefill(LENS, torch.tensor(slots)), cache)
    return cache, tables


def decode_step(model, cache: PagedKVCache, tables: list[list[int]], rows: list[int]) -> torch.Tensor:
    """One decode row per sequence in `rows` (token 7 + row, at position LENS[row]) -> hidden [B, H]."""
    ctx = [LENS[r] + 1 for r in rows]
    tabs = [tables[r][: -(-n // BS)] for r, n in zip(rows, ctx)]
    meta = AttentionMetadata.decode(tabs, ctx, [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tabs, ctx)], BS)
    return model(torch.tensor([7 + r for r in rows]), torch.tensor([LENS[r] for r in rows]), meta, cache)


def copy(cache: PagedKVCache) -> PagedKVCache:
    out = PagedKVCache.__new__(PagedKVCache)
    out.__dict__.update(cache.__dict__)
    out.k, out.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_accurate_as_torch_ops_against_fp64(native_kernel, dtype) -> None:
    model = tiny(dtype)
    ref_model = tiny(torch.float64)
    rows = list(range(len(LENS)))
    cache, tables = prefilled(model, dtype)
    ref_cache, _ = prefilled(ref_model, torch.float64)
    exact = decode_step(ref_model, ref_cache, tables, rows)
    theirs = decode_step(model, torch_cache := copy(cache), tables, rows)
    model.decode_layers = DecodeLayers(native_kernel, model)
    ours = decode_step(model, cache, tables, rows)
    assert ours.dtype == dtype and ours.shape == exact.shape
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-6, f"{dtype}: ours {err_ours:.3g}, torch's {err_theirs:.3g}"
    for layer in range(model.config.num_layers):  # the new rows' K/V, written where torch writes them
        for a, b in ((cache.k, torch_cache.k), (cache.v, torch_cache.v)):
            tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(a[layer], b[layer], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_batch_threads_or_prefill_rows(native_kernel, dtype) -> None:
    model = tiny(dtype)
    model.decode_layers = DecodeLayers(native_kernel, model)
    cache, tables = prefilled(model, dtype)
    rows = list(range(len(LENS)))
    threads = torch.get_num_threads()
    try:
        full = decode_step(model, copy(cache), tables, rows)
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            for r in rows:
                alone = decode_step(model, copy(cache), tables, [r])
                assert torch.equal(alone[0], full[r]), f"row {r}, {nt} threads"
    finally:
        torch.set_num_threads(threads)
    # beside a prefill chunk of a new prompt (blocks 60-63), in one forward
    ctx = [n + 1 for n in LENS]
    tabs = [t[: -(-n // BS)] for t, n in zip(tables, ctx)]
    new = random_prompts([9], seed=5)[0]
    meta = AttentionMetadata.mixed(tabs, ctx, [9], [0], [[]],
                                   [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tabs, ctx)]
                                   + slots_for([60], 0, 9, BS), BS)
    ids = torch.tensor([7 + r for r in rows] + new)
    mixed = model(ids, torch.tensor(LENS + list(range(9))), meta, copy(cache))
    assert torch.equal(mixed[:len(rows)], full)
    model.decode_layers = None
    chunk_alone = model(torch.tensor(new), torch.arange(9), AttentionMetadata.prefill([9], torch.tensor(slots_for([60], 0, 9, BS))), copy(cache))
    assert torch.equal(mixed[len(rows):], chunk_alone), "prompt rows keep torch's path"


@pytest.mark.parametrize("arch, extra, why", [
    ("qwen3", {}, "q/k norms"),
    ("qwen2", {}, "biases"),
    ("llama", {"hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 2}, "head_dim 10"),
])
def test_models_it_cannot_run_keep_the_per_linear_path(arch, extra, why, caplog) -> None:
    model = ours_from_hf(hf_tiny(arch, **extra), torch.bfloat16)  # bf16: no fp32 oneDNN packing in the way
    assert why in why_not(model)
    assert why_not(tiny(torch.float32)) is None
    with caplog.at_level(logging.INFO, logger="pd_local.model.llama"):
        model.set_native_decode(True)
    if not model.native_decode:
        pytest.skip("the native kernel is unavailable here")
    assert model.decode_layers is None and f"per linear ({why_not(model)})" in caplog.text


def test_weights_packed_for_onednn_give_the_layer_kernel_their_exact_panels(native_kernel, monkeypatch) -> None:
    """The AVX2 kind packs fp32 weights for oneDNN (opaque copies): decode rows still take whole
    native layers, with panels from the exact dense copies, so their bits equal an unpacked
    model's. The probe is forced here (this CPU's oneDNN may fail it); the real kernels run."""
    import pd_local.model.layers as layers
    from pd_local.model import native_linear

    monkeypatch.setattr(layers, "onednn_packing", lambda: True)
    monkeypatch.setattr(native_linear, "kernel", lambda: native_kernel)
    plain, packed = tiny(torch.float32), tiny(torch.float32).set_batch_invariant(True)
    assert packed.model.layers[0].self_attn.qkv_proj.weight.is_mkldnn
    plain.decode_layers = DecodeLayers(native_kernel, plain)
    packed.set_native_decode(True)
    assert packed.decode_layers is not None and not packed.native_decode  # lm_head stays oneDNN's
    cache, tables = prefilled(plain, torch.float32)
    rows = list(range(len(LENS)))
    assert torch.equal(decode_step(packed, copy(cache), tables, rows), decode_step(plain, copy(cache), tables, rows))


def test_a_cache_in_another_dtype_is_refused_by_name(native_kernel) -> None:
    model = tiny(torch.bfloat16)
    cache, tables = prefilled(model, torch.bfloat16)
    cache.k = [t.float() for t in cache.k]
    model.decode_layers = DecodeLayers(native_kernel, model)
    with pytest.raises(ValueError, match="KV cache torch.float32, activations torch.bfloat16"):
        decode_step(model, cache, tables, [0])
