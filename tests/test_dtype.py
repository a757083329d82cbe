"""dtype = "auto": bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere.

The decision is a pure function of (requested, device, /proc/cpuinfo flags), so both kinds of
CPU are covered on whichever machine runs the tests, with real flag lines of real processors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient

from pd_local.cluster.local import LocalWorld
from pd_local.config import ConfigError, EngineConfig, ServeConfig, TopologyConfig, load_config
from pd_local.model.dtype import (
    cpu_has_native_bf16,
    read_cpu_flags,
    resolve_dtype,
    resolve_dtype_name,
)
from pd_local.api.server import ServerSettings, create_app
from pd_local.tokenizer import Tokenizer
from tests.helpers import make_byte_fallback_tokenizer_dir, make_tiny_hf_model

# Abridged flag lines: an AVX2-only AMD EPYC (the second dev machine), a Sapphire Rapids Xeon
# (AMX), a Cooper Lake Xeon (avx512_bf16, no AMX) and a Skylake-SP (AVX-512 without bf16).
EPYC_AVX2 = "fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni"
SAPPHIRE_RAPIDS = ("fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 "
                   "avx512_fp16 amx_bf16 amx_tile amx_int8")
COOPER_LAKE = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16"
SKYLAKE_SP = "fpu sse2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl"


@pytest.mark.parametrize("flags, native", [
    (EPYC_AVX2, False), (SKYLAKE_SP, False), (COOPER_LAKE, True), (SAPPHIRE_RAPIDS, True),
    ("amx_bf16", True), ("", False),
    ("xavx512_bf16 avx512_bf16x", False),  # whole words only
])
def test_native_bf16_detection(flags: str, native: bool) -> None:
    assert cpu_has_native_bf16(flags) is native


@pytest.mark.parametrize("device, flags, want", [
    ("cpu", EPYC_AVX2, "float32"),
    ("cpu", SKYLAKE_SP, "float32"),
    ("cpu", COOPER_LAKE, "bfloat16"),
    ("cpu", SAPPHIRE_RAPIDS, "bfloat16"),
    ("cuda", EPYC_AVX2, "bfloat16"),  # the host CPU does not matter on CUDA
    ("cuda:1", "", "bfloat16"),
])
def test_auto_resolves_by_device_and_cpu(device: str, flags: str, want: str) -> None:
    name, why = resolve_dtype_name("auto", device, flags)
    assert name == want and why.startswith("auto:")


@pytest.mark.parametrize("explicit", ["bfloat16", "float32"])
def test_an_explicit_dtype_is_kept_on_every_device(explicit: str) -> None:
    for device, flags in (("cpu", EPYC_AVX2), ("cpu", SAPPHIRE_RAPIDS), ("cuda", "")):
        assert resolve_dtype_name(explicit, device, flags) == (explicit, "set in the config")


def test_unknown_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float32; got 'fp16'"):
        resolve_dtype_name("fp16", "cpu", "")


def test_resolve_dtype_gives_torch_dtypes_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="pd_local.model.dtype"):
        assert resolve_dtype("auto", "cpu", SAPPHIRE_RAPIDS) is torch.bfloat16
        assert resolve_dtype("auto", "cpu", EPYC_AVX2) is torch.float32
    assert "dtype bfloat16 on cpu (auto: CPU has native bf16" in caplog.text
    assert "dtype float32 on cpu (auto: CPU without avx512_bf16/amx_bf16" in caplog.text


def test_read_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {COOPER_LAKE}\n\n"
                    f"processor\t: 1\nflags\t\t: {COOPER_LAKE}\n")
    assert read_cpu_flags(info).split() == COOPER_LAKE.split()
    assert read_cpu_flags(tmp_path / "missing") == ""  # not Linux: auto then takes float32
    # This machine's own file parses (whatever it says) into flags that include sse2 on x86.
    if Path("/proc/cpuinfo").exists() and "x86" in __import__("platform").machine():
        assert "sse2" in read_cpu_flags().split()


def test_config_default_is_auto_and_old_values_stay_valid() -> None:
    assert load_config(None).dtype == "auto"
    for name in ("auto", "bfloat16", "float32"):
        assert load_config(None, {"dtype": name}).dtype == name
    with pytest.raises(ConfigError, match="dtype must be one of auto, bfloat16, float32"):
        load_config(None, {"dtype": "float16"})


def test_models_route_reports_the_dtype(tmp_path: Path) -> None:
    model_dir = make_tiny_hf_model(tmp_path, tokenizer_dir=make_byte_fallback_tokenizer_dir(tmp_path))
    world = LocalWorld(ServeConfig(model=str(model_dir), dtype="float32", topology=TopologyConfig(colocated=1),
                                   engine=EngineConfig(num_blocks=8, max_model_len=64)))
    assert world.router.ready.wait(timeout=60) and world.router.error is None
    app = create_app(world.router, Tokenizer.from_dir(model_dir), ServerSettings(model_name="tiny", dtype="float32"))
    with TestClient(app) as client:
        body = client.get("/v1/models").json()
    world.shutdown()
    assert body["data"][0]["pd_local"] == {"dtype": "float32"}
