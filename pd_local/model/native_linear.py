"""The native CPU kernels: native_linear.c (the decode-row linear) and native_decode.c (whole
decoder layers, model/native_decode.py), built into one library once per CPU and source with the
system C compiler, cached, and called through ctypes. Rows are batch-invariant by construction;
at one row the linear reads weights at about the memory's speed (docs/benchmarks/linear.md)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from pd_local.model.dtype import read_cpu_flags

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("native_linear.c", "native_decode.c")]  # one library
HEADER = Path(__file__).with_name("native_simd.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
ISA_NAMES = {1: "AVX2+FMA", 2: "AVX-512"}


class NativeKernelError(RuntimeError):
    """The kernel could not be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where built kernels live: $PD_LOCAL_CACHE, else $XDG_CACHE_HOME/pd_local, else ~/.cache/pd_local."""
    if os.environ.get("PD_LOCAL_CACHE"):
        return Path(os.environ["PD_LOCAL_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pd_local" / "kernels"


class NativeLinear:
    """The loaded library: `__call__(x, weight)` = x @ weight.T for CPU bf16/fp32 tensors, the
    weight packed into the kernel's panels (`pack`; pass `panel` to reuse a packed copy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.isa = self.lib.pdl_isa()
        self.panel_width = self.lib.pdl_panel_width()
        self.bf16_pairs = bool(self.lib.pdl_bf16_pairs())  # bf16 panels hold k pairs (VDPBF16PS)
        fn = self.lib.pdl_linear
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int] * 3
        fn.restype = None
        self._fn = fn
        layer = self.lib.pdl_decode_layer
        layer.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                                  ctypes.c_int]
        layer.restype = None
        self._layer = layer
        self.lib.pdl_layer_scratch.argtypes = [ctypes.c_void_p, ctypes.c_long]
        self.lib.pdl_layer_scratch.restype = ctypes.c_long

    def supports(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (self.isa > 0 and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float32)
                and not weight.is_mkldnn and x.dim() == 2)

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] -> panels [ceil(N / W), K, W] of W output columns (zeros past N); bf16
        where the kernel takes k pairs: [ceil(N / W), ceil(K / 2), W, 2] (a zero k past K)."""
        n, k = weight.shape
        w = weight.detach()
        panels = -(-n // self.panel_width)
        if panels * self.panel_width != n:
            w = torch.cat([w, w.new_zeros(panels * self.panel_width - n, k)])
        if self.bf16_pairs and w.dtype == torch.bfloat16:
            if k % 2:
                w = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)
            return w.view(panels, self.panel_width, -1, 2).permute(0, 2, 1, 3).contiguous()
        return w.view(panels, self.panel_width, k).transpose(1, 2).contiguous()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 panel: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K], weight [N, K] (same dtype) -> [M, N] in that dtype."""
        m, k = x.shape
        n = weight.shape[0]
        if weight.shape[1] != k:
            raise ValueError(f"native linear: x has {k} columns, weight {tuple(weight.shape)}")
        panel = self.pack(weight) if panel is None else panel
        xf = x.float().contiguous()  # a no-op for fp32; the kernel multiplies in fp32
        y = torch.empty(m, n, dtype=x.dtype)
        if m:
            self._fn(xf.data_ptr(), panel.data_ptr(), y.data_ptr(), m, n, k, int(panel.dtype == torch.bfloat16),
                     int(y.dtype == torch.bfloat16), torch.get_num_threads())
        return y if bias is None else y + bias

    def profile(self, on: bool) -> dict[str, float]:
        """Seconds spent, since the last call, in the kernel's linears, its decode attention and
        its whole decode layers (counted only while on; reset by every call)."""
        out = (ctypes.c_double * 3)()
        self.lib.pdl_profile(int(on), out)
        return {"linear_s": out[0], "attention_s": out[1], "layers_s": out[2]}

    def layer_scratch(self, spec: ctypes.Structure, rows: int) -> int:
        """Floats of scratch one decode_layer call over `rows` rows needs."""
        return self.lib.pdl_layer_scratch(ctypes.byref(spec), rows)

    def decode_layer(self, spec: ctypes.Structure, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     slots: torch.Tensor, tables: torch.Tensor, ctx: torch.Tensor, scratch: torch.Tensor,
                     threads: int) -> None:
        """One decoder layer on decode rows x [B, hidden], in place (model/native_decode.py)."""
        self._layer(ctypes.byref(spec), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                    tables.data_ptr(), tables.shape[1], ctx.data_ptr(), x.shape[0], scratch.data_ptr(), threads)


def build(directory: Path | None = None, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """The kernel's shared library for this source, CPU and compiler, building it if it is not in
    the cache (about a second). Raises NativeKernelError naming what failed. `extra_flags` (tests):
    e.g. -mno-avx512f builds the AVX2 variant on an AVX-512 CPU."""
    flags = [*FLAGS, *extra_flags]
    cc = compiler or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise NativeKernelError("no C compiler (gcc or cc) on PATH; set CC")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeKernelError(f"C compiler {cc!r} does not run: {e}") from None
    source = b"\0".join(p.read_bytes() for p in (*SOURCES, HEADER))
    key = hashlib.sha256(b"\0".join([source, version.encode(), read_cpu_flags().encode(), " ".join(flags).encode()]))
    directory = directory or cache_dir()
    path = directory / f"native_linear-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    log.info("building the native linear kernel with %s (%s), once per CPU and compiler ...", cc, " ".join(flags))
    t0 = time.monotonic()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # then renamed: ranks build at once
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            err = (done.stderr or done.stdout).strip().splitlines()
            raise NativeKernelError(f"{cc} failed ({done.returncode}): {' '.join(err[:3])[:300]}")
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeKernelError(f"{cc} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("native linear kernel built in %.1f s: %s", time.monotonic() - t0, path)
    return path


def load(directory: Path | None = None, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> NativeLinear:
    """Build (or find) and load the kernel; NativeKernelError if it cannot run on this CPU."""
    try:
        kernel = NativeLinear(build(directory, compiler, extra_flags))
    except OSError as e:
        raise NativeKernelError(f"cannot load the built kernel: {e}") from None
    if kernel.isa == 0:
        raise NativeKernelError("this CPU has neither AVX2+FMA nor AVX-512")
    return kernel


def total_memory() -> int | None:
    """MemTotal from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_on(copy_bytes: int, total: int | None) -> bool:
    """`native_linear = "auto"`: take the kernel when its copy of the weights is at most an eighth
    of the machine's memory (unknown: yes). MemTotal, not what is free now, so every rank of a
    world, and every run, decides the same: outputs must not depend on the topology."""
    return total is None or copy_bytes <= total // 8


@functools.cache
def kernel() -> NativeLinear | None:
    """The process's kernel, or None (with one warning saying why) where it cannot be had:
    callers then use torch's kernels, which are exact too, only slower at one row."""
    if os.environ.get("PD_LOCAL_NATIVE_LINEAR", "1") == "0":
        log.info("native linear kernel off (PD_LOCAL_NATIVE_LINEAR=0)")
        return None
    extra = tuple(os.environ.get("PD_LOCAL_NATIVE_CFLAGS", "").split())  # e.g. -mno-avx512f: the AVX2 path
    try:
        k = load(extra_flags=extra)
    except NativeKernelError as e:
        log.warning("native linear kernel unavailable, decode linears use torch's kernels: %s", e)
        return None
    log.info("native linear kernel: %s, %s", ISA_NAMES.get(k.isa, k.isa), k.path.name)
    return k
