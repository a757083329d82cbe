"""Llama building blocks: batch-invariant linear, RMSNorm, rotary embedding. `linear(...,
invariant=True)` gives a row the same bits at any batch size on CPU: oneDNN's packed kernel where
the first-use probe finds it invariant (fp32), else M padded to where the BLAS kernels agree,
and inside `decode_rows` the native kernel for decode rows (docs/benchmarks/linear.md)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pd_local.model import native_linear
from pd_local.model.config import ModelConfig

# How many leading rows of the forward in progress are decode rows (generated tokens): those go
# through the native kernel, the rest (prompt rows) through torch's. Set by `decode_rows`.
_DECODE_ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("pd_local_decode_rows", default=0)


@contextlib.contextmanager
def decode_rows(n: int):
    """Within this block, `linear(..., invariant=True)` on CPU sends the first n rows of x to the
    native decode kernel (when it is available). A row's kernel is then fixed by what it is, a
    generated token or a prompt token, never by what shares its batch."""
    token = _DECODE_ROWS.set(n)
    try:
        yield
    finally:
        _DECODE_ROWS.reset(token)


@functools.cache
def onednn_packing() -> bool:
    """Whether this torch can pack an fp32 weight for oneDNN's inner product AND, on this CPU,
    its rows come out the same for every M (probed once, on first use: kernels differ by ISA).
    Leaves torch's thread count as it found it."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), None)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8), w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    if not torch.equal(y, torch.full((1, 8), 8.0)):
        return False
    return _rows_invariant()


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's packed inner product; one row padded to two (another kernel on some CPUs)."""
    if x.shape[0] == 1:
        return torch.ops.mkldnn._linear_pointwise(torch.cat([x, x]), w, bias, "none", [], "")[:1]
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")  # [M, out]


def _rows_invariant() -> bool:
    """Rows of a packed fp32 linear equal for M = 1..17 and 64, at two shapes of the small
    models this runs (576 <-> 1536), at 1 thread and at the process's thread count."""
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        try:
            for k, out in ((576, 1536), (1536, 576)):
                w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(out, k, generator=g) * 0.05, None)
                x = torch.randn(64, k, generator=g)
                full = _onednn_linear(x, w, None)  # [64, out]
                for m in (*range(1, 18), 64):
                    part = _onednn_linear(x[:m].clone(), w, None)
                    if not torch.equal(part, full[:m]):
                        return False
        finally:
            torch.set_num_threads(threads)
    return True


def _weight_key(weight: torch.Tensor) -> tuple:
    """Changes when the weight does; a packed (opaque, replaced never updated) one: its identity."""
    if weight.is_mkldnn:
        return ("mkldnn", id(weight), weight.dtype, tuple(weight.shape))
    return (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), tuple(weight.stride()))


class PackedWeight:
    """oneDNN's blocked copy of one fp32 CPU weight, rebuilt when the weight changes; its holder
    keeps one so the reorder runs once."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [out, in] (plain) -> its packed copy (an mkldnn tensor of the same shape)."""
        key = _weight_key(weight)
        if self._packed is None or key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._key = key
        return self._packed

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight()  # an mkldnn tensor has no storage to copy; the copy repacks

    def __getstate__(self) -> dict:
        return {"_key": None, "_packed": None}


class PanelCache:
    """One weight's copy packed into the native kernel's panels, repacked whenever the weight
    changes; a Linear (or the model, for lm_head) keeps one."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._panel: torch.Tensor | None = None

    def get(self, kernel: native_linear.NativeLinear, weight: torch.Tensor) -> torch.Tensor:
        """The panels of `weight` (plain, or packed for oneDNN: then from its exact dense copy)."""
        key = _weight_key(weight)
        if self._panel is None or key != self._key:
            self._panel = kernel.pack(weight.to_dense() if weight.is_mkldnn else weight)
            self._key = key
        return self._panel


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    invariant: bool = True,
    packed: PackedWeight | None = None,
    panel: PanelCache | None = None,
) -> torch.Tensor:
    """F.linear over x [M, in] -> [M, out]; with `invariant` its rows do not depend on M (see
    module docstring), without it this is plain F.linear. `packed` caches the fp32 weight's
    oneDNN copy across calls (without it, a call reorders the weight itself: fine for tests).
    Inside `decode_rows(n)`, the first n rows take the native kernel where the weight is plain
    (`panel` caches the weight packed for it)."""
    if weight.is_mkldnn:  # a packed Linear (Linear.pack): its only copy, M-invariant as below
        return _onednn_linear(x, weight, bias)
    if not (invariant and x.device.type == "cpu"):
        return F.linear(x, weight, bias)
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and onednn_packing():
        return _onednn_linear(x, (packed or PackedWeight()).get(weight), bias)
    n = _DECODE_ROWS.get()
    nk = native_linear.kernel() if n else None
    if nk is None or not nk.supports(x, weight):
        return _padded_linear(x, weight, bias)
    w = (panel or PanelCache()).get(nk, weight)
    if n >= x.shape[0]:
        return nk(x, weight, bias, w)
    return torch.cat([nk(x[:n], weight, bias, w), _padded_linear(x[n:], weight, bias)])  # [M, out]


def native_eligible(weight: torch.Tensor) -> bool:
    """Whether `linear` would send decode rows against this weight to the native kernel (fp32
    weights on a CPU whose oneDNN probe passed take the packed kernel for every row instead)."""
    return (weight.device.type == "cpu" and not weight.is_mkldnn
            and (weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and not onednn_packing())))


def _padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with M padded to where torch's CPU kernels give every row the same bits."""
    m = x.shape[0]
    pad = 0
    if x.dtype == torch.float32 and m < 12 and m % 4:
        pad = 4 - m % 4
    elif x.dtype == torch.bfloat16 and m == 1:
        pad = 1
    if pad:
        padded = torch.cat([x, x.new_zeros(pad, x.shape[1])])  # [M + pad, in]
        return F.linear(padded, weight, bias)[:m]
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """nn.Linear's parameters (HF names `weight`, `bias`) with the batch-invariant forward
    (`batch_invariant = False` on an instance: plain F.linear)."""

    batch_invariant: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed = PackedWeight()
        self.panel = PanelCache()  # the weight packed for the native decode kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.batch_invariant, self.packed, self.panel)

    def pack(self) -> bool:
        """Replace the weight by its oneDNN copy, freeing the plain one (where the packed kernel is
        the exact one: fp32 on a CPU whose probe passed). Returns whether the weight is packed.
        A packed weight is opaque (no storage, no slicing): `unpack` gives the plain one back."""
        w = self.weight
        if w.is_mkldnn:
            return True
        if not (onednn_packing() and w.device.type == "cpu" and w.dtype == torch.float32):
            return False
        self.weight = nn.Parameter(self.packed.get(w), requires_grad=False)
        self.packed = PackedWeight()
        return True

    def unpack(self) -> None:
        """The plain weight back from the packed one (bit-identical: a reorder loses nothing)."""
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim): freed plain weights stayed
    resident under the packed copies (400 MB for SmolLM2) without it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def concat_linears(*parts: Linear) -> Linear:
    """One Linear whose output rows are the parts' rows, in order (for fusing projections that
    read the same input). Each output column is the same dot product as before."""
    for p in parts:
        p.unpack()  # packed weights are opaque; fusing comes before packing anyway
    weight = torch.cat([p.weight for p in parts]).detach()  # [sum(out_i), in]
    fused = Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]).detach(), requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back before the weight (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32), with Llama 3.x scaling when the config asks."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between them
    # interpolated linearly in 1/wavelength.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding; cos/sin computed per call (once per step) from fp32 positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, signed sin [T, 1, head_dim] (broadcast over heads) for apply_rope:
        the sin's first half is negated (rotate-half's minus sign, moved off the activations)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin().to(dtype)
        half = sin.shape[-1] // 2
        sin[:, :half].neg_()
        return emb.cos().to(dtype)[:, None, :], sin[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, signed_sin [T, 1, head_dim] from RotaryEmbedding.cos_sin.

    transformers computes x * cos + cat(-x2, x1) * sin; this is x * cos + cat(x2, x1) * (-s1, s2),
    the same products bit for bit (a sign flip is exact) in 3 kernels + a roll instead of 6
    (half the time per call at one decode row, measured on the AVX2 EPYC)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
