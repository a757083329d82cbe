"""CUDA graphs for the decode step, one per batch-size bucket (1, 2, 4, 8, then every 16), reading
one static input buffer; padded rows write a sink block no request owns. On CPU `run` executes the
padded batch eagerly, which tests the same inputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pd_local.model.attention import AttentionMetadata
from pd_local.model.kv_cache import PagedKVCache
from pd_local.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes to capture: 1, 2, 4, 8, then steps of 16, up to and including max_num_seqs."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return tuple(sorted(sizes))


def pick_bucket(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `batch` rows; None beyond the largest (run eagerly)."""
    if batch < 1:
        raise ValueError(f"a decode batch has >= 1 rows, got {batch}")
    for b in buckets:
        if b >= batch:
            return b
    return None


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step's inputs as host lists, one entry per running sequence."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # where each row's new K/V go (block * block_size + offset)
    block_tables: list[list[int]]
    context_lens: list[int]  # including the token being decoded

    def __len__(self) -> int:
        return len(self.token_ids)


class StaticDecodeInputs:
    """The inputs every captured graph reads: one int64 device buffer, laid out as five
    contiguous segments of `rows` (ids, positions, slots, context lengths; then the tables
    [rows, width]), and its host staging copy (pinned on CUDA)."""

    IDS, POS, SLOTS, CTX = range(4)

    def __init__(self, rows: int, width: int, sink_block: int, block_size: int,
                 device: torch.device) -> None:
        self.rows, self.width = rows, width
        self.sink_block, self.sink_slot = sink_block, sink_block * block_size
        pinned = device.type == "cuda"
        n = rows * (4 + width)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=pinned)
        self.device_buf = torch.zeros(n, dtype=torch.long, device=device)
        # the host buffer may be rewritten only once the last copy out of it has finished
        self._copied = torch.cuda.Event() if pinned else None
        self.fill_padding(rows)

    def _segment(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        return buf[i * self.rows:(i + 1) * self.rows]  # [rows]

    def _tables(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[4 * self.rows:].view(self.rows, self.width)  # [rows, width]

    def ids(self, n: int) -> torch.Tensor:
        return self._segment(self.device_buf, self.IDS)[:n]

    def positions(self, n: int) -> torch.Tensor:
        return self._segment(self.device_buf, self.POS)[:n]

    def meta(self, n: int) -> AttentionMetadata:
        """Decode metadata over the first n static rows; no row groups (the CUDA kernel needs
        none; the CPU path then attends over the full table width, padding masked)."""
        return AttentionMetadata(
            seq_lens=(), num_decode=n,  # n decode rows, no prefill chunk
            slot_mapping=self._segment(self.device_buf, self.SLOTS)[:n],
            block_tables=self._tables(self.device_buf)[:n],
            context_lens=self._segment(self.device_buf, self.CTX)[:n],
        )

    def fill_padding(self, n: int) -> None:
        """Make rows [0, n) padding rows (used before warm-up and capture)."""
        self.fill(DecodeBatch([], [], [], [], []), n)

    def fill(self, batch: DecodeBatch, n: int) -> None:
        """Write batch into rows [0, len(batch)), padding into [len(batch), n), and start the
        copy to the device (non-blocking; ordered before any later kernel on this stream)."""
        b = len(batch)
        if not b <= n <= self.rows:
            raise ValueError(f"{b} rows do not fit a bucket of {n} (buffers hold {self.rows})")
        too_wide = [len(t) for t in batch.block_tables if len(t) > self.width]
        if too_wide:
            raise ValueError(f"block table of {too_wide[0]} blocks, buffers hold {self.width}")
        if self._copied is not None:
            self._copied.synchronize()
        h = self.host
        for i, values, pad in ((self.IDS, batch.token_ids, 0), (self.POS, batch.positions, 0),
                               (self.SLOTS, batch.slots, self.sink_slot),
                               (self.CTX, batch.context_lens, 1)):
            seg = self._segment(h, i)
            seg[:b] = torch.tensor(values, dtype=torch.long)
            seg[b:n] = pad
        tables = self._tables(h)
        tables[:n] = self.sink_block  # padding rows, and entries past a real row's blocks
        for row, t in enumerate(batch.block_tables):
            tables[row, :len(t)] = torch.tensor(t, dtype=torch.long)
        # two copies: the four [rows] segments, then only the table rows in use
        head = 4 * self.rows
        self.device_buf[:head].copy_(h[:head], non_blocking=True)
        self._tables(self.device_buf)[:n].copy_(tables[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphRunner:
    """Runs decode steps of `model` over `kv_cache` through per-bucket CUDA graphs.

    `sink_block` is a cache block no request ever owns (the engine allocates one block more
    than its allocator manages). `capture()` (CUDA only) records the graphs; `run()` replays
    one, or runs the padded batch eagerly where no graph was captured (CPU)."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, max_num_seqs: int,
                 max_blocks_per_seq: int, sink_block: int, device: torch.device | str) -> None:
        if not 0 <= sink_block < kv_cache.num_blocks:
            raise ValueError(f"sink block {sink_block} outside the cache's {kv_cache.num_blocks}")
        self.model, self.kv_cache = model, kv_cache
        self.device = torch.device(device)
        self.buckets = graph_buckets(max_num_seqs)
        self.inputs = StaticDecodeInputs(self.buckets[-1], max_blocks_per_seq, sink_block,
                                         kv_cache.block_size, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # every graph copies its logits here: one [largest bucket, vocab] buffer for all of
        # them (per-graph outputs would hold sum(buckets) rows: 430 MB at 256 seqs, 49k vocab)
        self.logits: torch.Tensor | None = None

    def _forward(self, n: int) -> torch.Tensor:
        """The model over the first n static rows -> logits [n, vocab] (fp32)."""
        hidden = self.model(self.inputs.ids(n), self.inputs.positions(n), self.inputs.meta(n),
                            self.kv_cache)  # [n, hidden]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first so all share one memory pool."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        t0 = time.perf_counter()
        pool = None
        for n in reversed(self.buckets):
            self.inputs.fill_padding(n)
            side = torch.cuda.Stream(self.device)  # warm-up (Triton compiles) off the capture
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.logits is None:
                vocab = self.model.config.vocab_size
                self.logits = torch.empty(n, vocab, dtype=torch.float32, device=self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the rank's link threads may touch torch meanwhile; only this
            # thread's work is captured and checked
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[:n].copy_(self._forward(n))
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s",
                 list(self.buckets), time.perf_counter() - t0)

    def run(self, batch: DecodeBatch) -> torch.Tensor | None:
        """Logits [len(batch), vocab] of one decode step; None when the batch is larger than
        the largest bucket (the caller runs it eagerly). The result is a view of a static
        buffer: read it before the next call."""
        n = pick_bucket(len(batch), self.buckets)
        if n is None:
            return None
        self.inputs.fill(batch, n)
        graph = self.graphs.get(n)
        if graph is None:
            return self._forward(n)[:len(batch)]
        graph.replay()
        return self.logits[:len(batch)]
