"""One-GPU check: greedy parity on CUDA, decode/prefill speed against the roofline, KV transfer.

Run by benchmarks/gpu_check.sh (which first runs `pytest -m gpu`); see the README section
"Checking on a GPU". Sections, each timed and independent (one failing is recorded, the others
still run):

- bandwidth: device-to-device copy of 2 GiB; (read + written bytes) / time is the HBM figure the
  roofline uses.
- parity: a small random Llama (GQA, SmolLM2's tokenizer) under greedy decoding; transformers on
  CUDA is the reference. In-process engine (colocated path) and served colocated-1 and 1P1D on
  one GPU (share_device; its KV goes through CUDA IPC, cluster/ipc_transfer.py), in fp32 (must
  be identical) and bf16 (agreement, first divergence).
- decode: a ~1B Llama (Llama-3.2-1B shapes, random bf16 weights), decode step time at batch 1,
  16 and 64 with and without CUDA graphs, against the roofline (weights + KV read per step /
  copy bandwidth).
- prefill: TFLOP/s of one 2048-token prefill of that model (matmuls + causal attention), and
  whether SDPA's flash kernel accepts our prefill attention.
- decode_attention: the Triton paged kernel against the torch gather path, alone.
- kv_transfer: same-GPU KV hand-over between two processes: CUDA IPC (one device copy into the
  peer's buffer) against today's share_device path (device -> host -> gloo -> host -> device).

Writes JSON (--out) and prints a table. Speed figures are for this run's machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pd_local.config import EngineConfig  # noqa: E402
from pd_local.engine.engine import Engine  # noqa: E402
from pd_local.model.attention import AttentionMetadata  # noqa: E402
from pd_local.model.config import ModelConfig  # noqa: E402
from pd_local.model.llama import LlamaForCausalLM  # noqa: E402
from pd_local.engine.sampling import SamplingParams  # noqa: E402

DEV = torch.device("cuda")
LLAMA_1B = dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096,
                tie_word_embeddings=True)
# --smoke (the CPU test of this script, tests/test_gpu_check_smoke.py): every section's code on
# sizes that run in seconds; its figures mean nothing.
TINY_LLAMA = dict(LLAMA_1B, vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
FULL = dict(model=LLAMA_1B, batches=(1, 16, 64), prompt_len=512, steps=40, copy_bytes=2 << 30,
            prefill_tokens=2048, attn_context=1024, attn_heads=(32, 8), ipc_bytes=256 << 20)
SMOKE = dict(model=TINY_LLAMA, batches=(1, 4), prompt_len=40, steps=4, copy_bytes=16 << 20,
             prefill_tokens=96, attn_context=100, attn_heads=(8, 2), ipc_bytes=1 << 20)
SIZE = FULL


def cuda_time(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median seconds of fn over iters runs, timed with CUDA events (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if DEV.type == "cpu":  # the --device cpu smoke run
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


# --- bandwidth ----------------------------------------------------------------------------------

def check_bandwidth() -> dict[str, Any]:
    n = SIZE["copy_bytes"]
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    s = cuda_time(lambda: y.copy_(x), iters=10)
    return {"copy_bytes": n, "copy_s": s, "hbm_gbps": 2 * n / s / 1e9}


# --- parity -------------------------------------------------------------------------------------

def make_parity_model(root: Path, tokenizer_dir: Path) -> Path:
    """A random 4-layer Llama with GQA (8 heads / 2 KV heads) and SmolLM2's tokenizer, fp32."""
    import shutil

    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float().eval()
    out = root / "parity-llama"
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


PARITY_PROMPTS = [[1 + (13 * i + 7 * j) % 4000 for j in range(3 + 29 * i)] for i in range(8)]
PARITY_TOKENS = 32


def hf_greedy(model_dir: Path, dtype: torch.dtype) -> list[list[int]]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEV).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop, never mask EOS
    out = []
    with torch.no_grad():
        for p in PARITY_PROMPTS:
            ids = torch.tensor([p], device=DEV)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=PARITY_TOKENS, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    del model
    return out


def engine_greedy(model_dir: Path, dtype: torch.dtype) -> list[list[int]]:
    from pd_local.model.weights import load_model

    model, _ = load_model(model_dir, dtype, DEV)
    engine = Engine(model, EngineConfig(num_blocks=512, max_num_seqs=16, max_model_len=1024),
                    device=DEV)
    params = SamplingParams(temperature=0.0, max_tokens=PARITY_TOKENS, ignore_eos=True)
    res = [ids for ids, _ in engine.generate(PARITY_PROMPTS, params)]
    del engine, model
    return res


def served_texts(model_dir: Path, dtype: str, topo: list[str], log: Path) -> list[str]:
    import httpx

    from servers import start_server, stop_server  # benchmarks/servers.py

    share = ["--set", "share_device=true"] if DEV.type == "cuda" else []  # both ranks: one GPU
    flags = ["--model", str(model_dir), "--device", DEV.type, "--dtype", dtype, *topo, *share,
             "--set", "engine.max_num_seqs=16",
             "--set", "engine.max_model_len=1024", "--set", "engine.kv_cache_gb=1.0"]
    proc, url = start_server(f"serve {' '.join(topo)} {dtype}", flags, log, timeout_s=120)
    try:
        texts = []
        for p in PARITY_PROMPTS:
            r = httpx.post(f"{url}/v1/completions", timeout=120, trust_env=False,
                           json={"prompt": p, "max_tokens": PARITY_TOKENS, "temperature": 0.0,
                                 "ignore_eos": True})
            r.raise_for_status()
            texts.append(r.json()["choices"][0]["text"])
        return texts
    finally:
        stop_server(proc)


def compare_ids(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Tokens agreeing (all prompts), prompts identical, and each prompt's first divergence."""
    firsts = []
    same_tokens = 0
    for a, b in zip(ref, got):
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        firsts.append(d)
        same_tokens += len(a) if d is None else d
    total = sum(len(a) for a in ref)
    return {"identical": all(d is None for d in firsts), "agree_prefix_tokens": same_tokens,
            "tokens": total, "first_divergence": firsts}


def compare_texts(ref_ids: list[list[int]], texts: list[str], tok: Any) -> dict[str, Any]:
    """Served text against the reference ids: identical text, or the longest reference prefix
    (in tokens) the text starts with (prefixes that end inside a UTF-8 character skipped)."""
    firsts = []
    same = 0
    for ids, text in zip(ref_ids, texts):
        if tok.decode(ids) == text:
            firsts.append(None)
            same += len(ids)
            continue
        agree = 0
        for i in range(1, len(ids) + 1):
            prefix = tok.decode(ids[:i])
            if "\ufffd" in prefix:
                continue
            if not text.startswith(prefix):
                break
            agree = i
        firsts.append(agree)
        same += agree
    return {"identical": all(d is None for d in firsts), "agree_prefix_tokens": same,
            "tokens": sum(len(i) for i in ref_ids), "first_divergence": firsts}


def check_parity(tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    from pd_local.tokenizer import Tokenizer

    model_dir = make_parity_model(work, tokenizer_dir)
    tok = Tokenizer.from_dir(model_dir)
    out: dict[str, Any] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ref = hf_greedy(model_dir, dtype)
        res = {"engine_colocated_inprocess": compare_ids(ref, engine_greedy(model_dir, dtype))}
        served = (("served_colocated_1", ["--colocated", "1"]),
                  ("served_1p1d_one_gpu", ["--prefill", "1", "--decode", "1"]))
        if SIZE is SMOKE and dtype != torch.float32:
            served = ()  # the smoke run serves fp32 only (four CPU servers take minutes)
        for label, topo in served:
            try:
                texts = served_texts(model_dir, name, topo, work / f"{label}-{name}.log")
                res[label] = compare_texts(ref, texts, tok)
            except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                res[label] = {"error": repr(e)[:500]}
        out[name] = res
    return out


# --- decode and prefill speed -------------------------------------------------------------------

def random_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.rotary.to(DEV)
    return model.fuse_projections().eval()


def weight_bytes(model: LlamaForCausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_steps(model: LlamaForCausalLM, batch: int, graphs: bool) -> dict[str, Any]:
    prompt_len, steps = SIZE["prompt_len"], SIZE["steps"]
    cfg = model.config
    engine = Engine(model, EngineConfig(num_blocks=(batch * (prompt_len + steps + 16)) // 16 + 64,
                                        max_num_seqs=batch, max_model_len=2048,
                                        max_prefill_tokens=8192, cuda_graphs=graphs), device=DEV)
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 10, ignore_eos=True)
    for i in range(batch):
        engine.add_request(i, torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                           params)
    while engine.scheduler.waiting:  # the prefills
        engine.step()
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        events = engine.step()  # sampling reads the tokens: the step has finished on the GPU
        times.append(time.perf_counter() - t0)
        assert len(events) == batch
    ctx = prompt_len + 3 + steps // 2  # mean context during the timed steps
    del engine
    return {"step_ms": statistics.median(times) * 1e3, "mean_context": ctx}


def check_decode(bw: float) -> dict[str, Any]:
    cfg = ModelConfig(**SIZE["model"])
    model = random_llama(cfg)
    wbytes = weight_bytes(model)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()),
                           "weight_bytes": wbytes, "rows": []}
    for batch in SIZE["batches"]:
        for graphs in (False, True):
            r = decode_steps(model, batch, graphs)
            kv = batch * r["mean_context"] * cfg.kv_bytes_per_token * 2  # bf16: 2 bytes
            roof_ms = (wbytes + kv) / bw * 1e3
            out["rows"].append({"batch": batch, "cuda_graphs": graphs, **r, "kv_bytes": kv,
                                "roofline_ms": roof_ms, "of_roofline": roof_ms / r["step_ms"]})
    del model
    return out


def model_prefill(model: LlamaForCausalLM, t: int) -> torch.Tensor:
    """One cache-less forward of a t-token prompt (the model alone, no engine): [t, hidden]."""
    ids = torch.arange(1, t + 1, device=DEV)
    return model(ids, torch.arange(t, device=DEV), AttentionMetadata.prefill([t], None), None)


def check_prefill() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = ModelConfig(**SIZE["model"])
    model = random_llama(cfg)
    t = SIZE["prefill_tokens"]
    s = cuda_time(lambda: model_prefill(model, t), iters=5)
    layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t / 2  # QK^T, PV; causal
    flops = 2 * layer_params * t + attn
    flash = "yes"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model_prefill(model, t).sum().item()
    except RuntimeError as e:
        flash = f"no: {str(e)[:200]}"
    return {"tokens": t, "seconds": s, "tflops": flops / s / 1e12, "flash_attention": flash}


def check_decode_attention(bw: float) -> dict[str, Any]:
    """The Triton paged kernel against the torch path (gather + SDPA per block-count group, what
    the CPU runs) on CUDA, 1B-model heads (32 query / 8 KV, head_dim 64), bf16, 1024-token
    contexts, scattered blocks. Both must agree (max |diff| is reported); a failure of one side
    is recorded in its row and the other is still timed."""
    from pd_local.model import attention
    from pd_local.model.triton_attention import paged_decode_attention_triton

    (h, kvh), d, bs, ctx_len = SIZE["attn_heads"], 64, 16, SIZE["attn_context"]
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32  # the interpreter: no bf16
    rows = []
    for b in SIZE["batches"]:
        nblk = -(-ctx_len // bs)
        num_blocks = b * nblk + 8
        kc = torch.randn(num_blocks, bs, kvh, d, device=DEV, dtype=dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(b, h, d, device=DEV, dtype=dtype)
        perm = torch.randperm(num_blocks).tolist()
        tables = [perm[i * nblk:(i + 1) * nblk] for i in range(b)]
        meta = attention.AttentionMetadata.decode(tables, [ctx_len] * b, [0] * b, bs, DEV)
        grp = attention.DecodeGroup.build(None, tables, [ctx_len] * b, nblk, bs, DEV)
        row: dict[str, Any] = {"batch": b, "roofline_us": 2 * b * ctx_len * kvh * d * kc.element_size() / bw * 1e6}
        outs = {}
        for name, fn in (("triton", lambda: paged_decode_attention_triton(
                              q, kc, vc, meta.block_tables, meta.context_lens, 0.125)),
                         ("torch_gather", lambda: attention._decode_group(
                              q, kc, vc, grp.blocks, grp.mask, 0.125))):
            try:
                outs[name] = fn()
                row[f"{name}_us"] = cuda_time(fn, iters=20 if DEV.type == "cuda" else 2) * 1e6
            except Exception as e:  # noqa: BLE001 - recorded; the other side is still timed
                row[f"{name}_error"] = repr(e)[:300]
        if len(outs) == 2:
            row["max_abs_diff"] = (outs["triton"].float() - outs["torch_gather"].float()).abs().max().item()
            row["speedup"] = row["torch_gather_us"] / row["triton_us"]
        rows.append(row)
    return {"context": ctx_len, "dtype": str(dtype), "rows": rows}


# The two functions below run in spawned processes, which import this module afresh: DEV there
# is the default until set from the argument (it was not, and a CPU run waited for ever).

def _ipc_writer(wire: torch.Tensor, nbytes: int, iters: int, q: Any, device: str) -> None:
    global DEV
    DEV = torch.device(device)
    try:
        from pd_local.cluster.ipc import SharedTensor

        dst = SharedTensor.from_wire(wire).open()
        src = torch.ones(nbytes, dtype=torch.uint8, device=DEV)
        q.put(cuda_time(lambda: dst.copy_(src), iters=iters))
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it
        q.put(f"ipc writer failed: {e!r}")
        raise


def _gloo_end(rank: int, store_path: str, nbytes: int, iters: int, q: Any, device: str) -> None:
    try:
        _gloo_transfer(rank, store_path, nbytes, iters, q, torch.device(device))
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it
        q.put(f"gloo rank {rank} failed: {e!r}")
        raise


def _gloo_transfer(rank: int, store_path: str, nbytes: int, iters: int, q: Any,
                   device: torch.device) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    gpu = torch.ones(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for i in range(iters + 2):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:  # prefill: device -> host, send
            host.copy_(gpu)
            dist.send(host, 1)
        else:  # decode: receive, host -> device
            dist.recv(host, 0)
            gpu.copy_(host)
            if gpu.is_cuda:
                torch.cuda.synchronize()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 1:
        q.put(statistics.median(times))
    dist.destroy_process_group()


def _result(q: Any, timeout: float) -> float:
    """A child's figure, or its failure raised here (not a wait until the timeout)."""
    got = q.get(timeout=timeout)
    if isinstance(got, str):
        raise RuntimeError(got)
    return got


def check_kv_transfer(work: Path) -> dict[str, Any]:
    """CUDA IPC (one device copy into the peer's buffer) against the host + gloo path; on CPU
    (--smoke) only the gloo path runs: IPC shares CUDA memory alone."""
    import torch.multiprocessing as mp

    from pd_local.cluster.ipc import SharedTensor

    ctx = mp.get_context("spawn")
    nbytes = SIZE["ipc_bytes"]  # full: ~11k tokens of a 1B Llama's KV (bf16, 32 KB/token)
    q = ctx.Queue()
    out: dict[str, Any] = {"bytes": nbytes}
    if DEV.type == "cuda":
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=DEV)
        p = ctx.Process(target=_ipc_writer, daemon=True,
                        args=(SharedTensor.export(buf).to_wire(), nbytes, 10, q, str(DEV)))
        p.start()
        ipc_s = _result(q, 180)
        p.join(60)
        out.update(ipc_gbps=nbytes / ipc_s / 1e9, ipc_data_ok=bool((buf[:: 1 << 20] == 1).all()))
    store = str(work / "gloo_store")
    procs = [ctx.Process(target=_gloo_end, args=(r, store, nbytes, 5, q, str(DEV)), daemon=True)
             for r in (0, 1)]  # daemons: a failed peer left waiting must not keep us alive
    for pr in procs:
        pr.start()
    host_s = _result(q, 300)
    for pr in procs:
        pr.join(60)
    out["host_gloo_gbps"] = nbytes / host_s / 1e9
    if "ipc_gbps" in out:
        out["ipc_over_host"] = host_s / ipc_s
    return out


# --- main ---------------------------------------------------------------------------------------

def _num(x: float | None, width: int, digits: int, kind: str = "f") -> str:
    return f"{x:{width}.{digits}{kind}}" if x is not None else f"{'-':>{width}}"


def print_table(res: dict[str, Any]) -> None:
    print("\n== gpu_check summary ==")
    print(f"device: {res.get('device')}, torch {res.get('torch')}")
    for name, sec in res["sections"].items():
        print(f"[{name}] {sec.get('seconds', 0):.1f} s" + (f"  ERROR {sec['error']}" if "error" in sec else ""))
    bw = res["sections"].get("bandwidth", {}).get("result", {}).get("hbm_gbps")
    if bw:
        print(f"copy bandwidth: {bw:.0f} GB/s")
    par = res["sections"].get("parity", {}).get("result", {})
    for dt, rows in par.items():
        for where, r in rows.items():
            if "error" in r:
                print(f"parity {dt:9s} {where:28s} ERROR {r['error'][:120]}")
            else:
                print(f"parity {dt:9s} {where:28s} identical={r['identical']!s:5s} "
                      f"agree {r['agree_prefix_tokens']}/{r['tokens']} first divergence "
                      f"{r['first_divergence']}")
    dec = res["sections"].get("decode", {}).get("result")
    if dec:
        print(f"decode, Llama bf16 ({dec['params'] / 1e9:.3f} B params, random weights):")
        print("  batch graphs  step_ms  roofline_ms  of_roofline")
        for r in dec["rows"]:
            print(f"  {r['batch']:5d} {r['cuda_graphs']!s:6s} {r['step_ms']:8.2f} "
                  f"{r['roofline_ms']:11.2f} {r['of_roofline']:11.2f}")
    pre = res["sections"].get("prefill", {}).get("result")
    if pre:
        print(f"prefill {pre['tokens']} tokens: {pre['seconds'] * 1e3:.1f} ms, {pre['tflops']:.0f} TFLOP/s, "
              f"flash: {pre['flash_attention']}")
    att = res["sections"].get("decode_attention", {}).get("result")
    if att:
        print(f"paged decode attention, {att['context']}-token contexts ({att['dtype']}):")
        print("  batch  triton_us  torch_gather_us  speedup  roofline_us  max_abs_diff")
        for r in att["rows"]:
            print(f"  {r['batch']:5d} {_num(r.get('triton_us'), 10, 1)} "
                  f"{_num(r.get('torch_gather_us'), 16, 1)} {_num(r.get('speedup'), 8, 2)} "
                  f"{r['roofline_us']:12.1f}  {_num(r.get('max_abs_diff'), 12, 2, 'e')}")
            for key in ("triton_error", "torch_gather_error"):
                if key in r:
                    print(f"        {key}: {r[key][:150]}")
    kv = res["sections"].get("kv_transfer", {}).get("result")
    if kv and "ipc_gbps" in kv:
        print(f"same-GPU KV transfer: CUDA IPC {kv['ipc_gbps']:.0f} GB/s, host+gloo "
              f"{kv['host_gloo_gbps']:.1f} GB/s ({kv['ipc_over_host']:.0f}x), data ok {kv['ipc_data_ok']}")
    elif kv:
        print(f"KV transfer: host+gloo {kv['host_gloo_gbps']:.1f} GB/s (no CUDA: IPC not run)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu_check.json")
    ap.add_argument("--tokenizer", type=Path, default=REPO / ".whl" / "smollm2-tokenizer",
                    help="a directory with SmolLM2's tokenizer.json and tokenizer_config.json")
    ap.add_argument("--device", default="cuda", help="cpu: with --smoke, the CPU test of this script")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: every section's code runs in seconds; figures mean nothing")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["bandwidth", "parity", "decode", "prefill", "decode_attention",
                             "kv_transfer"])
    args = ap.parse_args()
    global DEV, SIZE
    DEV = torch.device(args.device)
    SIZE = SMOKE if args.smoke else FULL
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke run)"
    res: dict[str, Any] = {"device": name, "torch": torch.__version__, "sections": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    bw_holder: dict[str, float] = {"hbm_gbps": 0.0}

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in args.skip:
            return
        t0 = time.perf_counter()
        print(f"-- {name} ...", flush=True)
        try:
            res["sections"][name] = {"result": fn()}
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            traceback.print_exc()
            res["sections"][name] = {"error": repr(e)[:1000]}
        res["sections"][name]["seconds"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))  # partial results survive

    def bandwidth() -> dict[str, Any]:
        r = check_bandwidth()
        bw_holder["hbm_gbps"] = r["hbm_gbps"]
        return r

    # the quick measurements first: parity starts four servers and takes the longest
    section("bandwidth", bandwidth)
    section("decode", lambda: check_decode((bw_holder["hbm_gbps"] or 4000.0) * 1e9))
    section("prefill", check_prefill)
    section("decode_attention",
            lambda: check_decode_attention((bw_holder["hbm_gbps"] or 4000.0) * 1e9))
    section("kv_transfer", lambda: check_kv_transfer(work))
    section("parity", lambda: check_parity(args.tokenizer, work))
    print_table(res)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
