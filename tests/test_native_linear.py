"""The native CPU linear kernel: built with the real compiler into a cache, rows identical at every
M and thread count, close to torch's linear, and a clear error (then torch's kernels) where it
cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pd_local.model import native_linear
from pd_local.model.native_linear import NativeKernelError, build


@pytest.fixture
def kernel(native_kernel):
    return native_kernel


SHAPES = [(960, 576), (576, 1536), (100, 37), (7, 1000), (3, 5), (49, 17)]  # (N, K): tails of every kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_do_not_depend_on_m_or_threads(kernel, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for n, k in SHAPES:
            w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
            x = torch.randn(70, k, generator=g).to(dtype)
            torch.set_num_threads(threads)
            full = kernel(x, w)  # [70, N]
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                for m in (*range(1, 18), 33, 64, 65):
                    part = kernel(x[:m].clone(), w)
                    assert torch.equal(part, full[:m]), f"{dtype} N={n} K={k}: M={m} threads={nt} differs"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_close_to_torch_linear_with_bias(kernel, dtype) -> None:
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        x = torch.randn(9, k, generator=g).to(dtype)
        exact = F.linear(x.double(), w.double(), b.double())
        ours = kernel(x, w, b)
        assert ours.dtype == dtype and ours.shape == (9, n)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert (ours.double() - exact).abs().max().item() <= tol * max(1.0, exact.abs().max().item())
        # no worse than torch's own kernel in the same dtype
        theirs = (F.linear(x, w, b).double() - exact).abs().max().item()
        assert (ours.double() - exact).abs().max().item() <= 2 * theirs + 1e-6


def test_empty_batch_and_shape_mismatch(kernel) -> None:
    w = torch.randn(8, 16)
    assert kernel(torch.randn(0, 16), w).shape == (0, 8)
    with pytest.raises(ValueError, match="16"):
        kernel(torch.randn(2, 15), w)


def test_built_once_then_taken_from_the_cache(tmp_path) -> None:
    try:
        first = build(tmp_path)
    except NativeKernelError as e:
        pytest.skip(f"no compiler here: {e}")
    mtime = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_a_failing_compiler_is_named_and_the_server_falls_back(tmp_path, monkeypatch, caplog) -> None:
    with pytest.raises(NativeKernelError, match="false"):
        build(tmp_path, compiler="false")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NativeKernelError, match="no-such-cc"):
        build(tmp_path, compiler="/no-such-cc")
    # the process-wide accessor: one warning, then None (torch's kernels)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("PD_LOCAL_CACHE", str(tmp_path))
    native_linear.kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pd_local.model.native_linear"):
            assert native_linear.kernel() is None
        assert any("unavailable" in r.getMessage() and "false" in r.getMessage() for r in caplog.records)
    finally:
        native_linear.kernel.cache_clear()


def test_extra_compiler_flags_and_switching_it_off(tmp_path, monkeypatch) -> None:
    """PD_LOCAL_NATIVE_CFLAGS reaches the compiler (-mno-avx512f builds the AVX2 path, the way
    benchmarks/vs_llamacpp.py --emulate-avx2 measures that kind); PD_LOCAL_NATIVE_LINEAR=0 is off."""
    monkeypatch.setenv("PD_LOCAL_CACHE", str(tmp_path))
    monkeypatch.setenv("PD_LOCAL_NATIVE_CFLAGS", "-mno-avx512f")
    native_linear.kernel.cache_clear()
    try:
        k = native_linear.kernel()
        if k is None:
            pytest.skip("the native kernel cannot run here")
        assert k.isa == 1 and not k.bf16_pairs and k.path.parent == tmp_path / "kernels"
        monkeypatch.setenv("PD_LOCAL_NATIVE_CFLAGS", "--no-such-flag")
        native_linear.kernel.cache_clear()
        assert native_linear.kernel() is None  # a failed build: torch's kernels
        monkeypatch.setenv("PD_LOCAL_NATIVE_LINEAR", "0")
        monkeypatch.delenv("PD_LOCAL_NATIVE_CFLAGS")
        native_linear.kernel.cache_clear()
        assert native_linear.kernel() is None
    finally:
        native_linear.kernel.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_sends_decode_rows_to_the_kernel_and_prompt_rows_to_torch(kernel, dtype, monkeypatch) -> None:
    from pd_local.model import layers

    monkeypatch.setattr(native_linear, "kernel", lambda: kernel)
    if dtype == torch.float32 and layers.onednn_packing():
        pytest.skip("fp32 takes oneDNN's packed kernel on this CPU, for every row")
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(96, 40, generator=g) * 0.1).to(dtype)
    x = torch.randn(13, 40, generator=g).to(dtype)
    plain = layers.linear(x, w)  # outside decode_rows: torch's kernel for every row
    for n in (1, 5, 13, 20):
        with layers.decode_rows(n):
            mixed = layers.linear(x, w)
        d = min(n, 13)
        assert torch.equal(mixed[:d], kernel(x[:d], w)), f"decode rows of a {n}-row split"
        assert torch.equal(mixed[d:], plain[d:]), f"prompt rows of a {n}-row split"
        for r in range(13):  # each row as it would come out alone, in its own kind
            with layers.decode_rows(1 if r < d else 0):
                assert torch.equal(layers.linear(x[r:r + 1], w), mixed[r:r + 1])


def test_auto_takes_the_kernel_when_its_copy_fits_an_eighth_of_memory() -> None:
    gb = 2**30
    assert native_linear.auto_on(270 * 2**20, 24 * gb)  # SmolLM2 bf16 on this machine
    assert native_linear.auto_on(3 * gb, 24 * gb)
    assert not native_linear.auto_on(16 * gb, 64 * gb)  # an 8B model in bf16 on 64 GB
    assert native_linear.auto_on(16 * gb, None)
    total = native_linear.total_memory()
    assert total is None or total > 2**27


def test_engine_setting_decides_and_logs(caplog) -> None:
    from pd_local.config import EngineConfig
    from pd_local.engine.engine import Engine
    from tests.tiny_models import hf_tiny, ours_from_hf

    model = ours_from_hf(hf_tiny("llama"))
    if native_linear.kernel() is None:
        pytest.skip("the native kernel cannot run here")
    with caplog.at_level(logging.INFO, logger="pd_local.model.llama"):
        Engine(model, EngineConfig(num_blocks=8, native_linear="auto"))
    from pd_local.model.layers import native_eligible

    eligible = [m.weight for m in model.modules() if hasattr(m, "pack") and native_eligible(m.weight)]
    assert model.native_decode is bool(eligible or native_eligible(model.lm_head_weight))
    if layers_packed := [m for m in model.modules() if hasattr(m, "pack") and m.weight.is_mkldnn]:
        assert not model.native_decode, f"{len(layers_packed)} weights packed for oneDNN: none for the per-linear path"
    if model.native_decode:
        assert any("native decode kernel on" in r.getMessage() for r in caplog.records)
    Engine(model, EngineConfig(num_blocks=8, native_linear=False))
    assert model.native_decode is False and model.decode_layers is None
    Engine(model, EngineConfig(num_blocks=8, batch_invariant=False, native_linear=True))
    assert model.native_decode is False, "the kernel serves the batch-invariant path only"
