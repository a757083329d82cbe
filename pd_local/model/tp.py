"""Tensor parallelism applied from outside the model (as gpt-fast's tp.py): `shard` keeps one
rank's heads and FFN share in place and all-reduces after o_proj and down_proj; the model classes
never mention ranks (docs/architecture.md, Tensor parallel)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from pd_local.model.layers import Linear, PackedWeight, linear


def _part(w: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[rank]


def _set(lin: Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def shard(model: nn.Module, rank: int, tp: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep rank's share of `model` (a fused LlamaForCausalLM with plain weights: shard before
    packing), all-reducing o_proj's and down_proj's outputs over `group`. tp == 1: unchanged."""
    cfg = model.config
    cfg.check_tp(tp)
    if not 0 <= rank < tp:
        raise ValueError(f"tensor parallel rank {rank} outside [0, {tp})")
    if tp == 1:
        return model
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def reduce(_: nn.Module, __: object, out: torch.Tensor) -> torch.Tensor:
        """The partial sums of this rank's heads / FFN columns, summed in fp32 (bf16 partials
        summed in bf16 round once per rank: measured, 8 of 10 SmolLM2 greedy texts then differ)."""
        total = out.float()
        dist.all_reduce(total, group=group)
        return total.to(out.dtype)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            raise ValueError("shard a model with fused projections (fuse_projections first)")
        if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
            raise ValueError("a row-parallel projection with a bias would add it tp times")
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            lin.unpack()
        qkv, b = attn.qkv_proj.weight.detach(), attn.qkv_proj.bias
        split = [hq, hkv, hkv]
        _set(attn.qkv_proj, torch.cat([_part(w, rank, tp, 0) for w in qkv.split(split)]),
             None if b is None else torch.cat([_part(x, rank, tp, 0) for x in b.detach().split(split)]))
        gate_up = mlp.gate_up_proj.weight.detach()
        _set(mlp.gate_up_proj, torch.cat([_part(w, rank, tp, 0) for w in gate_up.chunk(2)]))
        _set(attn.o_proj, _part(attn.o_proj.weight.detach(), rank, tp, 1))
        _set(mlp.down_proj, _part(mlp.down_proj.weight.detach(), rank, tp, 1))
        attn.num_heads, attn.num_kv_heads = cfg.num_heads // tp, cfg.num_kv_heads // tp
        attn.o_proj.register_forward_hook(reduce)
        mlp.down_proj.register_forward_hook(reduce)
    model.config = dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                                       intermediate_size=cfg.intermediate_size // tp)
    if cfg.vocab_size % tp == 0:
        _vocab_parallel(model, rank, tp, group)
    return model


def _vocab_parallel(model: nn.Module, rank: int, tp: int, group: dist.ProcessGroup | None) -> None:
    """lm_head by vocabulary rows, the logits all-gathered: 1.6-1.8x the replicated lm_head's
    speed at 1-8 rows, equal at 64 (benchmarks/tp_lm_head.py); the same bits on every rank."""
    whole = model.lm_head_weight.detach()
    part, packed = whole.chunk(tp)[rank].contiguous(), PackedWeight()
    if model.lm_head is not None:  # untied: only this rank's rows stay (tied: the embedding's whole)
        model.lm_head.weight = nn.Parameter(part, requires_grad=False)

    @torch.inference_mode()
    def compute_logits(hidden: torch.Tensor, num_decode: int = 0) -> torch.Tensor:
        mine = linear(hidden, part, invariant=model.batch_invariant, packed=packed).float()  # [N, V / tp]
        parts = [torch.empty_like(mine) for _ in range(tp)]
        dist.all_gather(parts, mine, group=group)
        return torch.cat(parts, dim=1)  # [N, V]

    model.compute_logits = compute_logits
