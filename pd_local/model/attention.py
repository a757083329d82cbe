"""Attention over a flattened token batch: varlen causal prefill (chunks on top of a cached
prefix) and paged decode, both driven by an `AttentionMetadata` built once per step. Both are
batch-invariant, and prefill is chunk-invariant, bit for bit on CPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def host_to_device(values: list[int] | list[list[int]], device: torch.device | str) -> torch.Tensor:
    """int64 tensor of `values` on `device`; on CUDA a non-blocking copy from pinned memory
    (from pageable memory the host would wait for the GPU's queue)."""
    t = torch.tensor(values, dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows with the same block count, prepared once per step for every layer (CPU)."""

    rows: torch.Tensor | None  # [g] indices among the decode rows; None: all of them, in order
    blocks: torch.Tensor  # [g * nblk] the rows' first nblk block ids, row after row
    mask: torch.Tensor  # [g, 1, 1, nblk * block_size] fp32: 0 in each row's context, -inf past

    @classmethod
    def build(
        cls, rows: list[int] | None, tables: list[list[int]], context_lens: list[int], nblk: int,
        block_size: int, device: torch.device | str,
    ) -> DecodeGroup:
        """tables/context_lens: the group's rows' own (tables at least nblk long)."""
        blocks = host_to_device([b for t in tables for b in t[:nblk]], device)  # [g * nblk]
        past = torch.arange(nblk * block_size)[None, :] >= torch.tensor(context_lens)[:, None]  # [g, S]
        mask = torch.zeros(past.shape).masked_fill_(past, float("-inf"))
        return cls(None if rows is None else host_to_device(rows, device), blocks,
                   mask.to(device)[:, None, None, :])


@dataclass(frozen=True)
class AttentionMetadata:
    """A step's T rows: `num_decode` decode rows (`block_tables` [B, max_blocks], `context_lens`
    [B] counting the token decoded), then prefill chunks of `seq_lens`, chunk i at positions
    [prefix_lens[i], +seq_lens[i]) over a cached prefix at `prefix_slots[i]`. `slot_mapping` [T]
    is where each row's K/V goes (None: nothing is written)."""

    seq_lens: tuple[int, ...]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    decode_groups: tuple[DecodeGroup, ...] = ()  # CPU only: decode rows by block count
    num_decode: int = 0
    prefix_lens: tuple[int, ...] = ()  # empty: every chunk starts at position 0
    prefix_slots: tuple[torch.Tensor | None, ...] | None = None

    @property
    def cu_seqlens(self) -> list[int]:
        """Start offsets of each prefill chunk among the prefill rows, plus their total: len B + 1."""
        out = [0]
        for n in self.seq_lens:
            out.append(out[-1] + n)
        return out

    def without_decode_rows(self) -> AttentionMetadata:
        """The prefill chunks alone (rows num_decode.. of this step), for running them apart."""
        slots = None if self.slot_mapping is None else self.slot_mapping[self.num_decode:]
        return dataclasses.replace(self, slot_mapping=slots, block_tables=None, context_lens=None,
                                   decode_groups=(), num_decode=0)

    @classmethod
    def prefill(
        cls,
        seq_lens: list[int],
        slot_mapping: torch.Tensor | None = None,
        prefix_lens: list[int] | None = None,
        prefix_slots: list[torch.Tensor | None] | None = None,
    ) -> AttentionMetadata:
        """Prefill chunks only; prefix_lens/prefix_slots describe cached prefixes (default none)."""
        if not seq_lens or min(seq_lens) <= 0:
            raise ValueError(f"prefill needs at least one sequence of >= 1 token, got {seq_lens}")
        if prefix_lens is not None and len(prefix_lens) != len(seq_lens):
            raise ValueError(f"{len(prefix_lens)} prefix lengths for {len(seq_lens)} chunks")
        return cls(
            seq_lens=tuple(seq_lens), slot_mapping=slot_mapping,
            prefix_lens=tuple(prefix_lens or ()),
            prefix_slots=tuple(prefix_slots) if prefix_slots is not None else None,
        )

    @classmethod
    def decode(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Decode rows only (host lists -> device tensors)."""
        return cls.mixed(block_tables, context_lens, [], [], [], slot_mapping, block_size, device)

    @classmethod
    def mixed(
        cls,
        block_tables: list[list[int]],
        context_lens: list[int],
        chunk_lens: list[int],
        prefix_lens: list[int],
        prefix_slots: list[list[int]],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Decode rows (block_tables, context_lens) then prefill chunks (chunk_lens on top of
        prefix_lens cached tokens at prefix_slots); slot_mapping covers every row."""
        dev = device
        tables = ctx = None
        groups: dict[int, list[int]] = {}
        if block_tables:
            width = max(len(t) for t in block_tables)
            padded = [t + [0] * (width - len(t)) for t in block_tables]  # pad entries are masked
            tables = host_to_device(padded, dev)  # [B, width]
            ctx = host_to_device(context_lens, dev)  # [B]
            if torch.device(dev).type == "cpu":  # CUDA: the Triton kernel needs no groups
                for row, n in enumerate(context_lens):
                    groups.setdefault((n + block_size - 1) // block_size, []).append(row)
        decode_groups = tuple(
            DecodeGroup.build(None if len(groups) == 1 else rows, [block_tables[r] for r in rows],
                              [context_lens[r] for r in rows], nblk, block_size, dev)
            for nblk, rows in sorted(groups.items())
        )
        return cls(
            seq_lens=tuple(chunk_lens),
            slot_mapping=host_to_device(slot_mapping, dev),  # [T]
            block_tables=tables,
            context_lens=ctx,
            decode_groups=decode_groups,
            num_decode=len(block_tables),
            prefix_lens=tuple(prefix_lens),
            prefix_slots=tuple(host_to_device(s, dev) if s else None for s in prefix_slots),
        )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
    heads: range | None = None,
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into caches [num_blocks, block_size, kv_heads, head_dim]
    (`heads`: into those of the cache's heads only)."""
    nb, bs, h, d = k_cache.shape
    cut = slice(None) if heads is None else slice(heads.start, heads.stop)
    k_cache.view(nb * bs, h, d)[:, cut].index_copy_(0, slots, k)
    v_cache.view(nb * bs, h, d)[:, cut].index_copy_(0, slots, v)


# Query tiles aligned to absolute positions, each over keys [0, (t+1)*QUERY_TILE): a row's shapes
# depend on its position only, never on where its prompt was cut (chunk invariance).
QUERY_TILE = 64


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention of prefill chunks over [cached prefix + chunk]: q [T, H, D], k/v
    [T, KV, D] (prefill rows end to end) -> [T, H, D]; each chunk computed on its own."""
    out = torch.empty_like(q)
    start = 0
    for i, n in enumerate(meta.seq_lens):
        p0 = meta.prefix_lens[i] if meta.prefix_lens else 0
        prefix = None
        if p0:
            if k_cache is None or v_cache is None or meta.prefix_slots is None:
                raise ValueError("a chunk on top of a cached prefix needs the KV cache and prefix_slots")
            slots = meta.prefix_slots[i]
            nb, bs, kvh, d = k_cache.shape
            prefix = (k_cache.view(nb * bs, kvh, d).index_select(0, slots),
                      v_cache.view(nb * bs, kvh, d).index_select(0, slots))  # [p0, KV, D] each
        end = start + n
        out[start:end] = _chunk_attention(q[start:end], k[start:end], v[start:end], prefix, p0, scale)
        start = end
    return out


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    p0: int,
    scale: float,
) -> torch.Tensor:
    """Positions [p0, p0 + n): q [n, H, D], k/v [n, KV, D], prefix K/V [p0, KV, D] -> [n, H, D]."""
    n, h, d = q.shape
    kvh = k.shape[1]
    tq = QUERY_TILE
    first, last = p0 // tq, (p0 + n - 1) // tq
    s_pad = (last + 1) * tq
    # Keys [0, s_pad): prefix, chunk, then zeros (finite, so a 0 weight x value stays 0).
    kk = q.new_zeros(1, kvh, s_pad, d)  # [1, KV, S_pad, D]
    vv = q.new_zeros(1, kvh, s_pad, d)
    if prefix is not None:
        kk[0, :, :p0], vv[0, :, :p0] = prefix[0].transpose(0, 1), prefix[1].transpose(0, 1)
    kk[0, :, p0:p0 + n], vv[0, :, p0:p0 + n] = k.transpose(0, 1), v.transpose(0, 1)
    ntile = last - first + 1
    off = p0 - first * tq
    qq = q.new_zeros(1, h, ntile * tq, d)  # [1, H, ntile*TQ, D]: rows outside the chunk are 0
    qq[0, :, off:off + n] = q.transpose(0, 1)
    out = torch.empty_like(qq)
    for j in range(ntile):
        s = (first + j + 1) * tq
        rows = slice(j * tq, (j + 1) * tq)
        # [1, H, TQ, D] against [1, KV, S, D]; the mask is the causal one aligned bottom-right
        # (SDPA's is_causal aligns top-left when the query is shorter than the keys).
        out[:, :, rows] = F.scaled_dot_product_attention(
            qq[:, :, rows], kk[:, :, :s], vv[:, :, :s], attn_mask=_tile_mask(s, q.device),
            scale=scale, enable_gqa=True,
        )
    return out[0, :, off:off + n].transpose(0, 1)  # [n, H, D]


_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def _tile_mask(s: int, device: torch.device) -> torch.Tensor:
    """[TQ, s] bool, True where key j <= query (s - TQ + i); cached per (s, device)."""
    key = (s, str(device))
    m = _MASKS.get(key)
    if m is None:
        m = torch.ones(QUERY_TILE, s, dtype=torch.bool, device=device).tril(s - QUERY_TILE)
        _MASKS[key] = m
    return m


# Gathered K/V bytes per CPU decode-attention call: small enough to be read back from cache, not
# DRAM (docs/benchmarks/decode-attention.md). Which rows share a call never changes a row's result.
DECODE_GATHER_BYTES = 4 << 20


def _rows_per_call(seq_len: int, k_cache: torch.Tensor) -> int:
    """How many rows of a group one SDPA call takes: their gathered K + V (seq_len keys each)
    within DECODE_GATHER_BYTES, at least one."""
    _, _, kvh, d = k_cache.shape
    per_row = 2 * seq_len * kvh * d * k_cache.element_size()
    return max(1, DECODE_GATHER_BYTES // per_row)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query token per sequence against its paged context: q [B, H, D] -> [B, H, D]. Rows
    are grouped by block count, so a row's reductions never depend on the batch's longest row."""
    if q.device.type == "cuda":  # Triton loops over each row's own context: no groups needed
        from pd_local.model.triton_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    groups = meta.decode_groups
    if not groups:  # a padded CUDA-graph batch run eagerly: one group, full width
        bs = k_cache.shape[1]
        groups = (DecodeGroup.build(None, meta.block_tables.tolist(), meta.context_lens.tolist(),
                                    meta.block_tables.shape[1], bs, q.device),)
    first = groups[0]
    if first.rows is None and _rows_per_call(first.mask.shape[-1], k_cache) >= q.shape[0]:
        return _decode_group(q, k_cache, v_cache, first.blocks, first.mask, scale)  # one call
    out = torch.empty_like(q)
    for grp in groups:
        g = grp.mask.shape[0]
        nblk = grp.blocks.numel() // g
        step = _rows_per_call(grp.mask.shape[-1], k_cache)
        for i in range(0, g, step):
            j = min(g, i + step)
            blocks, mask = grp.blocks[i * nblk:j * nblk], grp.mask[i:j]
            if grp.rows is None:  # the group is every row, in order
                out[i:j] = _decode_group(q[i:j], k_cache, v_cache, blocks, mask, scale)
            else:
                rows = grp.rows[i:j]
                out.index_copy_(0, rows, _decode_group(q.index_select(0, rows), k_cache, v_cache,
                                                       blocks, mask, scale))
    return out


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [g, H, D]; blocks [g * nblk], mask [g, 1, 1, S] -> [g, H, D]: one SDPA call, each KV
    head's query heads padded to a multiple of 4 rows (batch invariance with any thread count:
    docs/benchmarks/decode-attention.md)."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    grp = h // kvh
    rows = -(-grp // 4) * 4
    s = mask.shape[-1]
    k = k_cache.index_select(0, blocks).view(b, s, kvh, d).transpose(1, 2)  # [g, KV, S, D] view
    v = v_cache.index_select(0, blocks).view(b, s, kvh, d).transpose(1, 2)  # [g, KV, S, D] view
    # contiguous: one layout in every call (q may be a view of the fused rope output)
    qg = q.contiguous().view(b, kvh, grp, d)  # [g, KV, G, D]
    if rows != grp:
        qg = torch.cat([qg, qg.new_zeros(b, kvh, rows - grp, d)], dim=2)  # [g, KV, R, D]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [g, KV, R, D]
    return o[:, :, :grp].reshape(b, h, d)  # [g, KV, G, D] -> [g, H, D]
