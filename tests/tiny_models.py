"""In-memory tiny random models: a transformers reference and our model with the same weights."""

from __future__ import annotations

import torch

from pd_local.model.config import ModelConfig
from pd_local.model.llama import LlamaForCausalLM

VOCAB = 320


def hf_tiny(arch: str = "llama", tie: bool = True, seed: int = 0, **extra: object) -> torch.nn.Module:
    import transformers as tf

    cfgs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }
    ccls, mcls = cfgs[arch]
    kw: dict[str, object] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, rms_norm_eps=1e-5,
    )
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(extra)
    torch.manual_seed(seed)
    return mcls(ccls(**kw)).eval()


def ours_from_hf(hf: torch.nn.Module, dtype: torch.dtype = torch.float32, fuse: bool = True) -> LlamaForCausalLM:
    """Our model with hf's weights; fused projections by default, as load_model gives."""
    raw = hf.config.to_dict()
    raw["architectures"] = [type(hf).__name__]
    model = LlamaForCausalLM(ModelConfig.from_dict(raw))
    params = dict(model.named_parameters())
    state = {k: v for k, v in hf.state_dict().items() if k in params}
    missing = set(params) - set(state)
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    model = model.to(dtype).eval()
    return model.fuse_projections() if fuse else model


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    return ours_from_hf(hf_tiny(arch, seed=seed), dtype)


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
