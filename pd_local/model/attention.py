"""Attention over a flattened token batch: varlen causal prefill and paged decode.

The model never sees requests; it sees an `AttentionMetadata` built once per step by the engine
(or a prefill rank) and passed explicitly through `forward`. No global context.

Prefill attention reads only the K/V of the current call (we never prefill on top of a cached
prefix: a preempted sequence is recomputed from its first token), so a prefill-only rank needs no
paged cache at all. Decode attention reads every context token from the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def host_to_device(values: list[int] | list[list[int]], device: torch.device | str) -> torch.Tensor:
    """int64 tensor of `values` on `device`. On CUDA through pinned memory with a non-blocking
    copy: a copy from pageable memory makes the host wait until the GPU has drained the work
    queued before it, which would cost a host sync per tensor per step."""
    t = torch.tensor(values, dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs to know about the batch. Build with `prefill()` or `decode()`.

    prefill: `seq_lens` are the lengths of the sequences laid end to end in the T tokens.
    decode: one token per sequence; `block_tables` [B, max_blocks] and `context_lens` [B]
    (context includes the token being decoded).
    `slot_mapping` [T]: where each token's K/V goes in the paged cache (block * block_size +
    offset); None means nothing is written (a prefill-only rank).
    """

    is_prefill: bool
    seq_lens: tuple[int, ...]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    # decode on CPU: rows grouped by their own block count, (num_blocks, row indices [g]); see
    # paged_decode_attention for why. Empty on CUDA, and for a padded CUDA-graph batch.
    decode_groups: tuple[tuple[int, torch.Tensor], ...] = ()

    @property
    def cu_seqlens(self) -> list[int]:
        """Start offsets of each sequence in the flattened batch, plus the total: len B + 1."""
        out = [0]
        for n in self.seq_lens:
            out.append(out[-1] + n)
        return out

    @classmethod
    def prefill(cls, seq_lens: list[int], slot_mapping: torch.Tensor | None = None) -> AttentionMetadata:
        if not seq_lens or min(seq_lens) <= 0:
            raise ValueError(f"prefill needs at least one sequence of >= 1 token, got {seq_lens}")
        return cls(is_prefill=True, seq_lens=tuple(seq_lens), slot_mapping=slot_mapping)

    @classmethod
    def decode(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build once per step (host lists -> device tensors); every layer reuses it."""
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]  # pad entries are masked
        groups: dict[int, list[int]] = {}
        if torch.device(device).type == "cpu":  # CUDA: the Triton kernel needs no groups
            for row, n in enumerate(context_lens):
                groups.setdefault((n + block_size - 1) // block_size, []).append(row)
        return cls(
            is_prefill=False,
            seq_lens=(1,) * len(block_tables),
            slot_mapping=host_to_device(slot_mapping, device),  # [B]
            block_tables=host_to_device(padded, device),  # [B, width]
            context_lens=host_to_device(context_lens, device),  # [B]
            decode_groups=tuple(
                (nblk, torch.tensor(rows, dtype=torch.long, device=device)) for nblk, rows in sorted(groups.items())
            ),
        )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads, head_dim]."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: tuple[int, ...], scale: float
) -> torch.Tensor:
    """Causal attention within each sequence. q [T, H, D], k/v [T, KV, D] -> [T, H, D].

    One SDPA call per sequence: no cross-sequence masking to get wrong, and a sequence's result
    does not depend on its neighbours (batch invariance).
    """
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        end = start + n
        # 4-D [1, heads, n, D]: with 3-D inputs torch 2.13 falls back to the math kernel on CPU
        # (measured 3x slower: bmm + softmax + mask materialised), with 4-D it takes flash.
        qs = q[start:end].transpose(0, 1)[None]  # [1, H, n, D]
        ks = k[start:end].transpose(0, 1)[None]  # [1, KV, n, D]
        vs = v[start:end].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)  # [n, H, D]
        start = end
    return out


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query token per sequence against its paged context. q [B, H, D] -> [B, H, D].

    Batch invariance: a sequence's scores and weighted sum are reduced over a length that
    depends only on that sequence (its own block count x block_size), never on the longest
    sequence in the batch; measured in fp32 on CPU, padding to the batch's longest context
    changes a row's result by ~2e-5. So rows are grouped by block count and each group runs one
    batched attention. Query heads are grouped per KV head so K/V are never repeated (GQA).
    """
    if q.device.type == "cuda":
        # Triton reads K/V through the block table (no gather) and loops over each row's own
        # context: batch-invariant without groups, so CUDA metadata carries none.
        from pd_local.model.triton_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    if not meta.decode_groups:  # a padded CUDA-graph batch run eagerly: one group, full width
        return _decode_group(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    if len(meta.decode_groups) == 1:
        nblk, _ = meta.decode_groups[0]
        return _decode_group(q, k_cache, v_cache, meta.block_tables[:, :nblk], meta.context_lens, scale)
    out = torch.empty_like(q)
    for nblk, rows in meta.decode_groups:
        tables = meta.block_tables.index_select(0, rows)[:, :nblk]  # [g, nblk]
        o = _decode_group(q.index_select(0, rows), k_cache, v_cache, tables, meta.context_lens.index_select(0, rows), scale)
        out.index_copy_(0, rows, o)
    return out


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [g, H, D]; tables [g, nblk] -> [g, H, D], attending over nblk * block_size slots.

    One SDPA call over the gathered blocks, the padding past each row's context masked. Its
    kernel reduces each (row, head) on its own, so a row's result does not depend on g (checked
    bit for bit by tests/test_engine.py). Measured on the 2-core AVX2 CPU, fp32, 1 thread, 144
    slots: 6x faster at g = 16 than matmul + softmax + matmul, which also needed K copied
    contiguous (a matmul against a permuted K view took a BLAS path whose result depended on g).
    """
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    s = tables.shape[1] * bs
    flat = tables.reshape(-1)  # index_select: ~2x faster than advanced indexing k_cache[tables]
    k = k_cache.index_select(0, flat).view(b, s, kvh, d).transpose(1, 2)  # [g, KV, S, D] view
    v = v_cache.index_select(0, flat).view(b, s, kvh, d).transpose(1, 2)  # [g, KV, S, D] view
    keep = torch.arange(s, device=q.device)[None, :] < context_lens[:, None]  # [g, S]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=keep[:, None, None, :], scale=scale, enable_gqa=True
    )  # [g, H, 1, D]
    return o.reshape(b, h, d)
