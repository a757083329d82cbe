"""`dtype = "auto"`: bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16),
float32 elsewhere, where bf16 is emulated and 3-4x slower (docs/design.md). A pure function of
the device and the CPU flags, so every rank resolves it alike and tests cover both kinds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPE_CHOICES: tuple[str, ...] = ("auto", "bfloat16", "float32")
TORCH_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# /proc/cpuinfo names of the instructions that make bf16 matmuls native on x86.
NATIVE_BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpu_flags: str) -> bool:
    """Whether a /proc/cpuinfo `flags` line names bf16 instructions (whole words only)."""
    words = set(cpu_flags.split())
    return any(f in words for f in NATIVE_BF16_CPU_FLAGS)


def read_cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first processor's flags from /proc/cpuinfo; "" without one (auto: float32)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return value
    return ""


def resolve_dtype_name(requested: str, device: str, cpu_flags: str) -> tuple[str, str]:
    """(dtype name, why) for a requested dtype on a device ("cpu", "cuda", "cuda:N");
    ValueError naming the choices for anything else."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {requested!r}")
    if requested != "auto":
        return requested, "set in the config"
    if device.split(":")[0] == "cuda":
        return "bfloat16", "auto: CUDA device"
    if cpu_has_native_bf16(cpu_flags):
        return "bfloat16", "auto: CPU has native bf16 (avx512_bf16 or amx_bf16)"
    return "float32", "auto: CPU without avx512_bf16/amx_bf16 (bf16 would be emulated)"


def resolve_dtype(requested: str, device: str, cpu_flags: str | None = None) -> torch.dtype:
    """The torch dtype for `requested` on `device`, logged once; reads /proc/cpuinfo when
    cpu_flags is None. Call once per rank at start-up, never per step."""
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    name, why = resolve_dtype_name(requested, device, flags)
    log.info("dtype %s on %s (%s)", name, device, why)
    return TORCH_DTYPES[name]
