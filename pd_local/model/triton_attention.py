"""Paged decode attention for CUDA in Triton: one program per (sequence, KV head) walks its own
context through the block table with an online softmax, with no gather copy and no host value in
the launch (CUDA graphs replay it). Tested on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr,
    scale,
    stride_qb, stride_qh,  # q [B, H, D], last dim contiguous
    stride_kb, stride_kt, stride_kh,  # caches [num_blocks, block_size, KV, D], last dim contiguous
    stride_ob, stride_oh,
    stride_tb,  # tables [B, max_blocks]
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    GROUP_P: tl.constexpr,  # GROUP and HEAD_DIM rounded up to powers of two (>= 16 for tl.dot)
    DIM_P: tl.constexpr,
    TILE: tl.constexpr,  # context tokens per loop iteration
    PRECISION: tl.constexpr,  # "ieee" for fp32 (tl.dot would take tf32 otherwise), "tf32" else
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)

    g = tl.arange(0, GROUP_P)  # [GP]
    d = tl.arange(0, DIM_P)  # [DP]
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kvh * GROUP + g  # query heads of this KV head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [GP, DP]

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([GROUP_P], tl.float32)  # running sum of exp
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    n = tl.arange(0, TILE)  # [TILE]
    for start in range(0, ctx, TILE):
        pos = start + n
        n_ok = pos < ctx
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=n_ok, other=0)
        row = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [TILE, DP]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GP, TILE]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [GP, TILE]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [TILE, DP]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    tile: int = 64,
) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, KV, D]; block_tables [B, >= max blocks]
    (entries past a row's context are never read); context_lens [B] (>= 1, including the token
    being decoded) -> [B, H, D] in q's dtype. No host sync: nothing here reads a device value."""
    b, h, dim = q.shape
    _, block_size, kvh, dim_k = k_cache.shape
    if dim_k != dim or h % kvh or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)} (H must be a multiple of KV, D equal)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("q and the caches need a contiguous last dimension (and equal K/V strides)")
    out = torch.empty_like(q)
    if b == 0:
        return out
    group = h // kvh
    _paged_decode_kernel[(b, kvh)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=dim, BLOCK_SIZE=block_size,
        GROUP_P=_pow2_at_least(group, 16), DIM_P=_pow2_at_least(dim, 16),
        TILE=_pow2_at_least(tile, 16),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
