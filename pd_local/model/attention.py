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
    max_context_len: int = 0

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
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        slot_mapping: torch.Tensor,
        max_context_len: int,
    ) -> AttentionMetadata:
        return cls(
            is_prefill=False,
            seq_lens=(1,) * block_tables.shape[0],
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
            max_context_len=max_context_len,
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
        qs = q[start:end].transpose(0, 1)  # [H, n, D]
        ks = k[start:end].transpose(0, 1)  # [KV, n, D]
        vs = v[start:end].transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)  # [n, H, D]
        start = end
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its paged context. q [B, H, D] -> [B, H, D].

    Gathers whole blocks (the padded length is a multiple of block_size, whatever the batch, which
    keeps the fp32 reduction order independent of the other sequences), masks the tail past each
    context length, and groups query heads per KV head so K/V are never repeated (GQA).
    """
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    nblk = (max_context_len + bs - 1) // bs
    tables = block_tables[:, :nblk]  # [B, nblk]
    s = nblk * bs
    k = k_cache[tables].view(b, s, kvh, d).permute(0, 2, 3, 1)  # [B, KV, D, S]
    v = v_cache[tables].view(b, s, kvh, d).transpose(1, 2)  # [B, KV, S, D]
    qg = q.view(b, kvh, h // kvh, d)  # [B, KV, G, D]
    scores = torch.matmul(qg, k).float() * scale  # [B, KV, G, S]
    pad = torch.arange(s, device=q.device)[None, :] >= context_lens[:, None]  # [B, S]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, KV, G, D]
    return out.reshape(b, h, d)
