"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as a plain nn.Module with HF parameter
names. It knows no ranks or requests: a flattened batch with an explicit `AttentionMetadata`, the
KV cache an argument; `on_layer_kv` hands out each layer's K/V of the prompt rows (not the decode
rows) as soon as it exists."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pd_local.model import native_decode, native_linear
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.attention import (
    AttentionMetadata,
    paged_decode_attention,
    prefill_attention,
    write_kv,
)
from pd_local.model.config import ModelConfig
from pd_local.model.layers import (
    Linear, PackedWeight, PanelCache, RMSNorm, RotaryEmbedding, apply_rope, concat_linears, decode_rows, linear,
    native_eligible, return_freed_memory,
)

log = logging.getLogger(__name__)

LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: Linear | None = None  # set by fuse(): q, k, v in one matmul

    def fuse(self) -> None:
        """Replace q/k/v_proj by one Linear of their concatenated rows (one matmul, not three;
        measured ~1.5 ms per 30-layer step on the dev CPU together with MLP fusion)."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = concat_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (out [T, hidden], k [T, KV, D], v [T, KV, D])."""
        t = x.shape[0]
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None and self.q_norm is None:
            # q and k sit side by side in the fused output: one rope call over both heads
            qkv = self.qkv_proj(x)  # [T, hq + 2 hkv]
            qk = apply_rope(qkv[:, :hq + hkv].view(t, -1, self.head_dim), cos, sin)  # [T, H + KV, D]
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, KV, D]
            v = qkv[:, hq + hkv:].view(t, self.num_kv_heads, self.head_dim)  # [T, KV, D]
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split([hq, hkv, hkv], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, KV, D]
            v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, KV, D]
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k_cache is not None and meta.slot_mapping is not None:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        nd = meta.num_decode  # decode rows first, then prefill chunks
        if nd == t:
            o = self._decode(q, k_cache, v_cache, meta)  # [T, H, D]
        elif nd == 0:
            o = prefill_attention(q, k, v, meta, k_cache, v_cache, self.scale)  # [T, H, D]
        else:
            o = torch.cat([self._decode(q[:nd], k_cache, v_cache, meta),
                           prefill_attention(q[nd:], k[nd:], v[nd:], meta, k_cache, v_cache, self.scale)])
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim)), k, v


    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, meta: AttentionMetadata
    ) -> torch.Tensor:
        if k_cache is None or v_cache is None:
            raise ValueError("decode attention needs a KV cache")
        return paged_decode_attention(q, k_cache, v_cache, meta, self.scale)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gate_up_proj: Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace gate/up_proj by one Linear of their concatenated rows."""
        if self.gate_up_proj is not None:
            return
        self.gate_up_proj = concat_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_out, k, v = self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.lm_head_packed = PackedWeight()  # lm_head_weight's oneDNN copy (tied or not)
        self.lm_head_panel = PanelCache()  # and its native kernel's copy

    def fuse_projections(self) -> LlamaForCausalLM:
        """Fuse q/k/v and gate/up projections, in place, after the weights are loaded.

        Parameter names are Hugging Face's until this is called (that is how weights load);
        afterwards the model has `qkv_proj` / `gate_up_proj` instead. Results are unchanged
        (each output column is the same dot product)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    batch_invariant: bool = True
    native_decode: bool = False  # decode rows' linears in the native CPU kernel (Engine sets it)
    decode_layers: native_decode.DecodeLayers | None = None  # and their whole layers, where it can

    def set_batch_invariant(self, on: bool) -> LlamaForCausalLM:
        """Exact batch invariance of every linear and lm_head (default on). Where the exact kernel
        is oneDNN's packed one (fp32 CPU), weights are swapped for packed copies (one copy in
        memory)."""
        self.batch_invariant = on
        packed = 0
        for m in self.modules():
            if isinstance(m, Linear):
                m.batch_invariant = on
                if on and not m.weight.is_mkldnn and m.pack():
                    packed += m.weight.numel() * 4
                elif not on:
                    m.unpack()
        if packed:
            return_freed_memory()
            log.info("linear weights packed for oneDNN's batch-invariant kernel: %.0f MB, plain copies "
                     "freed", packed / 2**20)
        return self

    def set_native_decode(self, mode: bool | str) -> LlamaForCausalLM:
        """Decode rows in the native CPU kernels (model/native_linear.py): whole layers where
        `native_decode.why_not` allows, else each linear whose weight is plain; True, False or
        "auto" (on if the kernel's copy of the weights is at most an eighth of the machine's
        memory). The copy is packed here, so the first step does not pay for it. Where the kernel
        cannot be had (one warning says why), or nothing would take it, nothing changes."""
        self.native_decode = False
        self.decode_layers = None
        nk = native_linear.kernel() if mode else None
        if nk is None:
            return self
        pairs = [(m.panel, m.weight) for m in self.modules() if isinstance(m, Linear)]
        per_linear = [(c, w) for c, w in [*pairs, (self.lm_head_panel, self.lm_head_weight)] if native_eligible(w)]
        why = native_decode.why_not(self)
        layer = [] if why else [(m.panel, m.weight) for m in native_decode.layer_linears(self)]
        todo = list({id(c): (c, w) for c, w in [*per_linear, *layer]}.values())
        if not todo:
            return self
        total = sum(w.numel() * w.element_size() for _, w in todo)
        memory = native_linear.total_memory()
        if mode == "auto" and not native_linear.auto_on(total, memory):
            log.info("native decode kernel off (auto): its copy of the weights, %.0f MB, is over an eighth "
                     "of this machine's %.0f MB; engine.native_linear = true forces it", total / 2**20,
                     (memory or 0) / 2**20)
            return self
        for cache, w in todo:
            cache.get(nk, w)
        self.native_decode = bool(per_linear)
        self.decode_layers = None if why else native_decode.DecodeLayers(nk, self)
        log.info("native decode kernel on: %.0f MB of weights packed into its panels; %s", total / 2**20,
                 f"per linear ({why})" if why else "whole layers")
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache | None = None,
        on_layer_kv: LayerKVHook | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final normed hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)  # [T, 1, D]
        nd = meta.num_decode
        if (nd and self.decode_layers is not None and kv_cache is not None
                and meta.slot_mapping is not None and meta.block_tables is not None):
            # decode rows through the native layer kernel, prompt rows (if any) through torch's ops
            xd = self.decode_layers(x[:nd], cos[:nd], sin[:nd], meta, kv_cache)  # [nd, hidden]
            if nd < x.shape[0]:
                rest = self._layers(x[nd:], cos[nd:], sin[nd:], meta.without_decode_rows(), kv_cache,
                                    on_layer_kv)
                xd = torch.cat([xd, rest])  # [T, hidden]
            return self.model.norm(xd)
        return self.model.norm(self._layers(x, cos, sin, meta, kv_cache, on_layer_kv))

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_cache: PagedKVCache | None, on_layer_kv: LayerKVHook | None) -> torch.Tensor:
        """x [T, hidden] through every decoder layer in torch's ops (decode rows' linears in the
        native kernel where it is on)."""
        with decode_rows(meta.num_decode if self.native_decode else 0):
            for i, layer in enumerate(self.model.layers):
                k_cache = kv_cache.k[i] if kv_cache is not None else None
                v_cache = kv_cache.v[i] if kv_cache is not None else None
                x, k, v = layer(x, cos, sin, meta, k_cache, v_cache)
                if on_layer_kv is not None:
                    on_layer_kv(i, k[meta.num_decode:], v[meta.num_decode:])
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, num_decode: int = 0) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32; the first num_decode rows are decode
        rows (see forward)."""
        with decode_rows(num_decode if self.native_decode else 0):
            return linear(hidden, self.lm_head_weight, invariant=self.batch_invariant,
                          packed=self.lm_head_packed, panel=self.lm_head_panel).float()
