"""Prefill and decode throughput of the pd_local engine vs transformers `generate`, same run.

Same weights, dtype, threads and machine; figures are ratios (ours / transformers) because the
machines we develop on are shared and noisy. Writes JSON and prints a table.

    python benchmarks/engine_vs_transformers.py [--model DIR] [--dtype auto] [--out FILE]

--step-timed 1000:16 adds a row timed differently: decode steps after the prefill of 16
prompts of 1000 tokens (the whole-run difference above drowns in a long prefill's noise).

--dtype defaults to "auto", resolved as the engine resolves it (pd_local.model.dtype: bfloat16
on CPUs with native bf16, float32 otherwise), so the default measures what `pd-local serve`
runs by default on this CPU; the JSON records the resolved dtype and why.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.model.dtype import DTYPE_CHOICES, read_cpu_flags, resolve_dtype_name
from pd_local.model.weights import load_model
from pd_local.engine.sampling import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Best wall time of fa() and of fb() over `repeats` interleaved rounds, after a warm-up of
    each: interleaving exposes both to the same background load, and the minimum is the run the
    load disturbed least."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = clock()
            fn()
            acc.append(clock() - t0)
    return min(ta), min(tb)


def ours_run(model, prompt: list[int], batch: int, new_tokens: int, invariant: bool = True) -> None:
    eng = Engine(model, EngineConfig(num_blocks=batch * ((len(prompt) + new_tokens) // 16 + 2), max_num_seqs=batch,
                                     max_prefill_tokens=len(prompt) * batch, batch_invariant=invariant))
    eng.generate([prompt] * batch, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))


def hf_run(hf, prompt: list[int], batch: int, new_tokens: int) -> None:
    ids = torch.tensor([prompt] * batch)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def ours_steps(model, prompt: list[int], batch: int, steps: int) -> float:
    """Seconds per decode step of `batch` copies of prompt, timed after the prefill (and 2
    warm-up steps): the whole-run difference above drowns in the prefill's noise when the
    prompts are long."""
    n = len(prompt)
    eng = Engine(model, EngineConfig(num_blocks=batch * ((n + steps + 8) // 16 + 2), max_num_seqs=batch,
                                     max_prefill_tokens=n * batch, max_model_len=n + steps + 8))
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        eng.add_request(i, prompt, params)
    started: set[int] = set()
    while len(started) < batch:  # prefills (chunked or not) until every prompt has its first token
        started.update(ev.req_id for ev in eng.step())
    for _ in range(2):
        eng.step()
    t0 = clock()
    for _ in range(steps):
        eng.step()
    return (clock() - t0) / steps


def hf_steps(hf, prompt: list[int], batch: int, steps: int) -> float:
    """The same for transformers: one forward of the prompts, then greedy steps on its cache."""
    with torch.inference_mode():
        out = hf(torch.tensor([prompt] * batch), use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps + 2):
            if i == 2:
                t0 = clock()
            out = hf(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return (clock() - t0) / steps


def cpu_kind() -> dict:
    """What decides our kernels' speed on this CPU: model name and the SIMD / bf16 flags."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name":
            info["model"] = val.strip()
        elif key.strip() == "flags":
            wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
            info["flags"] = [f for f in val.split() if f in wanted]
            break
    info["cores"] = len([ln for ln in text.splitlines() if ln.startswith("processor")])
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="auto: what the engine picks on this CPU (float32 without native bf16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inexact-batches", default="1",
                    help="also time these decode batches with engine.batch_invariant = false")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: this process's CPU time, for a machine shared with other jobs "
                         "(time spent descheduled is not counted; memory contention still is)")
    ap.add_argument("--step-timed", default="",
                    help="CONTEXT:BATCH[,...]: also time decode steps after the prefill of "
                         "BATCH prompts of CONTEXT tokens (long contexts), e.g. 1000:16")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per --step-timed round")
    ap.add_argument("--out", default="benchmarks/results/engine_vs_transformers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if args.model is None:
        from pd_local.cli.weights import ensure_default_model

        args.model = str(ensure_default_model())
    from transformers import AutoModelForCausalLM

    dtype_name, dtype_why = resolve_dtype_name(args.dtype, "cpu", read_cpu_flags())
    dtype = DTYPES[dtype_name]
    ours, cfg = load_model(args.model, dtype)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    rows = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    prompt = torch.randint(100, cfg.vocab_size, (args.prefill_len,), generator=g).tolist()
    log(f"prefill {args.prefill_len} tokens ...")
    t_ours, t_hf = timed_pair(lambda: ours_run(ours, prompt, 1, 1), lambda: hf_run(hf, prompt, 1, 1), args.repeats)
    rows.append({"case": f"prefill {args.prefill_len} tok", "unit": "tok/s",
                 "ours": args.prefill_len / t_ours, "transformers": args.prefill_len / t_hf})

    prompt = prompt[: args.decode_prompt_len]
    n = args.new_tokens
    for b in [int(x) for x in args.batches.split(",") if x]:
        log(f"decode batch {b} ({n} new tokens after a {len(prompt)}-token prompt) ...")
        # decode time = (prompt + n tokens) - (prompt + 1 token): the prefill cancels out
        full_ours, full_hf = timed_pair(lambda: ours_run(ours, prompt, b, n), lambda: hf_run(hf, prompt, b, n), args.repeats)
        pre_ours, pre_hf = timed_pair(lambda: ours_run(ours, prompt, b, 1), lambda: hf_run(hf, prompt, b, 1), args.repeats)
        d_ours, d_hf = full_ours - pre_ours, full_hf - pre_hf
        rows.append({"case": f"decode batch {b}", "unit": "tok/s",
                     "ours": b * (n - 1) / d_ours, "transformers": b * (n - 1) / d_hf})
        if str(b) in args.inexact_batches.split(","):
            log(f"decode batch {b}, batch_invariant = false ...")
            full_ours, full_hf = timed_pair(lambda: ours_run(ours, prompt, b, n, False),
                                            lambda: hf_run(hf, prompt, b, n), args.repeats)
            pre_ours, pre_hf = timed_pair(lambda: ours_run(ours, prompt, b, 1, False),
                                          lambda: hf_run(hf, prompt, b, 1), args.repeats)
            rows.append({"case": f"decode batch {b}, batch_invariant=false", "unit": "tok/s",
                         "ours": b * (n - 1) / (full_ours - pre_ours),
                         "transformers": b * (n - 1) / (full_hf - pre_hf)})
    for spec in filter(None, args.step_timed.split(",")):
        ctx, b = (int(x) for x in spec.split(":"))
        long_prompt = torch.randint(100, cfg.vocab_size, (ctx,), generator=g).tolist()
        log(f"decode batch {b} after {ctx}-token prompts, {args.steps} steps timed after the prefill ...")
        per = [(ours_steps(ours, long_prompt, b, args.steps), hf_steps(hf, long_prompt, b, args.steps))
               for _ in range(args.repeats)]  # interleaved rounds; the best of each
        rows.append({"case": f"decode batch {b}, {ctx}-token context (step-timed)", "unit": "tok/s",
                     "ours": b / min(o for o, _ in per), "transformers": b / min(h for _, h in per),
                     "rounds_ratio": [h / o for o, h in per]})
    for r in rows:
        r["ratio"] = r["ours"] / r["transformers"]
    result = {
        "model": args.model, "dtype": dtype_name, "dtype_why": dtype_why, "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "cpu": cpu_kind(),
        "new_tokens": n, "decode_prompt_len": len(prompt), "rows": rows,
    }
    print("\n| case | ours tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours']:.1f} | {r['transformers']:.1f} | {r['ratio']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
