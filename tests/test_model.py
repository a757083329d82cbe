"""The model against transformers, and paged decode attention against dense attention."""

from __future__ import annotations

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


def test_rows_do_not_depend_on_batch_size_fp32() -> None:
    """Batch invariance: a decode row's logits are bit-identical alone or among 1..12 others."""
    ours = ours_from_hf(hf_tiny("llama"))
    x = torch.randn(13, 64)
    from pd_local.model.layers import linear

    w = ours.model.layers[0].mlp.down_proj.weight[:, :64]
    full = linear(x, w)
    for m in range(1, 13):
        assert torch.equal(linear(x[:m], w), full[:m]), f"rows differ at batch {m}"


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
