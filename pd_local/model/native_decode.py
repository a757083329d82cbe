"""Decode rows through native_decode.c's whole-layer kernel: one C call per decoder layer (norms,
fused projections, rope, the KV write, paged attention, SiLU, residuals) instead of ~40 torch ops.
Prompt rows never come here; a row's path is fixed by what it is, never by its batch."""

from __future__ import annotations

import ctypes

import torch

from pd_local.model.attention import AttentionMetadata
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.native_linear import NativeLinear

MAX_GROUP, MAX_HEAD_DIM = 16, 256  # the kernel's stack buffers (MAXG, MAXD in native_decode.c)


class LayerSpec(ctypes.Structure):
    """native_decode.c's pdl_layer: one layer's shapes and pointers."""

    _fields_ = [(name, ctypes.c_long) for name in ("hidden", "heads", "kv_heads", "head_dim", "inter", "block_size")]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("bf16", ctypes.c_int), ("w_bf16", ctypes.c_int)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("ln1", "ln2", "qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


def projections(layer) -> tuple:
    """A decoder layer's projections in the order the kernel takes them: qkv, o, gate_up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def why_not(model) -> str | None:
    """Why the layer kernel cannot run this model (None: it can). Models with q/k norms or
    projection biases keep the per-linear path."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        return f"dtype {dtype}"
    if cfg.qk_norm or cfg.attention_bias:
        return "q/k norms or attention biases"
    if cfg.head_dim % 16 or cfg.head_dim > MAX_HEAD_DIM or cfg.num_heads % cfg.num_kv_heads \
            or cfg.num_heads // cfg.num_kv_heads > MAX_GROUP:
        return f"head_dim {cfg.head_dim}, {cfg.num_heads} heads over {cfg.num_kv_heads}"
    for layer in model.model.layers:
        linears = projections(layer)
        if None in linears:
            return "projections not fused"
        if any(m.bias is not None or m.weight.dtype != dtype for m in linears):
            return "a projection with a bias or in another dtype"
        if any(m._forward_hooks for m in linears):  # the kernel would skip them (tensor parallel's all-reduce)
            return "a projection with a forward hook"
        if any(n.weight.dtype != dtype for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return "norm weights in another dtype"
    return None


def layer_linears(model) -> list:
    """The projections the layer kernel reads (their panels; fp32 weights packed for oneDNN
    included: their panels come from the exact dense copy)."""
    return [m for layer in model.model.layers for m in projections(layer)]


class DecodeLayers:
    """`__call__(x, cos, sin, meta, kv_cache)` runs every layer on decode rows x [B, hidden]."""

    def __init__(self, kernel: NativeLinear, model) -> None:
        self.kernel = kernel
        self.model = model
        self._specs: list[LayerSpec] = []
        self._cache_key: tuple[int, ...] = ()

    def specs(self, kv_cache: PagedKVCache) -> list[LayerSpec]:
        key = tuple(t.data_ptr() for t in (*kv_cache.k, *kv_cache.v))
        if key != self._cache_key:
            self._specs = [self._spec(layer, k, v, kv_cache.block_size)
                           for layer, k, v in zip(self.model.model.layers, kv_cache.k, kv_cache.v)]
            self._cache_key = key
        return self._specs

    def _spec(self, layer, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int) -> LayerSpec:
        cfg, nk = self.model.config, self.kernel
        panels = [m.panel.get(nk, m.weight) for m in projections(layer)]
        bf16 = int(k_cache.dtype == torch.bfloat16)
        return LayerSpec(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                         block_size, cfg.rms_norm_eps, layer.self_attn.scale, bf16, int(panels[0].dtype == torch.bfloat16),
                         layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                         *(p.data_ptr() for p in panels), k_cache.data_ptr(), v_cache.data_ptr())

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: PagedKVCache) -> torch.Tensor:
        """x [B, hidden], cos / sin [B, 1, head_dim] -> x after every layer (a new tensor); writes
        each row's K/V at meta.slot_mapping[:B]."""
        b = x.shape[0]
        if kv_cache.k[0].dtype != x.dtype:
            raise ValueError(f"native decode layers: KV cache {kv_cache.k[0].dtype}, activations {x.dtype}")
        x = x.contiguous().clone()
        cos, sin = cos.reshape(b, -1).contiguous(), sin.reshape(b, -1).contiguous()  # [B, D]
        slots = meta.slot_mapping[:b].contiguous()
        tables, ctx = meta.block_tables.contiguous(), meta.context_lens.contiguous()  # [B, W], [B]
        specs = self.specs(kv_cache)
        scratch = torch.empty(self.kernel.layer_scratch(specs[0], b), dtype=torch.float32)
        nt = torch.get_num_threads()
        for spec in specs:
            self.kernel.decode_layer(spec, x, cos, sin, slots, tables, ctx, scratch, nt)
        return x
