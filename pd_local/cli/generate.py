"""`pd-local generate`: offline batch generation in one process. Each input line is a chat
completions body; each output line (same order) its completion or an error naming the line. All
lines run at once (continuous batching): the reference the server's outputs are checked against."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pd_local.engine.structured import GrammarTokenizer
from pd_local.api.openai_request import GenerationRequest, RequestError, parse_request
from pd_local.api.textstream import TextStream
from pd_local.config import ConfigError, EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.scheduler import FinishReason
from pd_local.model.dtype import DTYPE_CHOICES, resolve_dtype
from pd_local.tokenizer import Tokenizer

log = logging.getLogger("pd_local.cli.generate")


def run_batch(
    engine: Engine, tokenizer: Tokenizer, requests: dict[int, GenerationRequest], progress: bool = False
) -> dict[int, dict[str, Any]]:
    """Run every request to completion on `engine`; returns result records keyed like `requests`."""
    streams = {i: TextStream(tokenizer, r.stop) for i, r in requests.items()}
    tokens: dict[int, list[int]] = {i: [] for i in requests}
    results: dict[int, dict[str, Any]] = {}
    for i, r in requests.items():
        engine.add_request(i, r.prompt_ids, r.params)
    t0, done_tokens, last_report = time.monotonic(), 0, 0.0
    while len(results) < len(requests):
        for ev in engine.step():
            i = ev.req_id
            tokens[i].append(ev.token_id)
            done_tokens += 1
            stream = streams[i]
            stream.push(ev.token_id)
            reason = FinishReason.STOP if stream.stopped else ev.finish_reason
            if stream.stopped and not ev.finished:
                engine.abort(i)  # a stop string ended it: free its blocks now
            if stream.stopped or ev.finished:
                stream.finish()
                results[i] = {
                    "text": stream.text,
                    "token_ids": tokens[i],
                    "finish_reason": reason,
                    "prompt_tokens": len(requests[i].prompt_ids),
                    "completion_tokens": len(tokens[i]),
                }
        now = time.monotonic()
        if progress and (now - last_report > 2.0 or len(results) == len(requests)):
            last_report = now
            rate = done_tokens / max(now - t0, 1e-9)
            print(f"\r[generate] {len(results)}/{len(requests)} done, {done_tokens} tokens, "
                  f"{rate:.1f} tok/s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-local generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the fetched SmolLM2)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--input", required=True, help="JSONL file of chat-completions bodies ('-' = stdin)")
    p.add_argument("--output", required=True, help="JSONL file to write ('-' = stdout)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: torch's own choice, one per physical core)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[generate] %(message)s", stream=sys.stderr)
    try:
        # max_prefill_tokens: this command's default before the configs were unified (the
        # [engine] table's is 2048); kept so its batching, and timing, stay as they were.
        engine_cfg = EngineConfig(kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
                                  max_model_len=args.max_model_len, max_prefill_tokens=4096,
                                  threads=args.threads)
    except ConfigError as e:
        print(f"pd-local generate: {e}", file=sys.stderr)
        return 2
    if args.model is None:
        from pd_local.cli.weights import ensure_default_model

        model_dir = ensure_default_model()
    else:
        model_dir = Path(args.model)
    from pd_local.model.weights import load_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        lines = (sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")).read().splitlines()
    except OSError as e:
        print(f"pd-local generate: cannot read --input: {e}", file=sys.stderr)
        return 2
    try:
        model, _ = load_model(model_dir, resolve_dtype(args.dtype, args.device), args.device)
        tokenizer = Tokenizer.from_dir(model_dir)
    except (OSError, ValueError) as e:
        print(f"pd-local generate: cannot load the model: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, engine_cfg, stop_token_ids=tokenizer.stop_token_ids, device=args.device,
                    grammar_tokenizer=GrammarTokenizer(tokenizer))
    records: dict[int, dict[str, Any]] = {}
    requests: dict[int, GenerationRequest] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as e:
            records[n] = {"line": n, "error": {"message": f"line {n}: invalid JSON: {e}", "param": None}}
            continue
        try:
            requests[n] = parse_request(body, "chat", tokenizer, engine.max_model_len)
            if requests[n].logprobs is not None:
                del requests[n]
                raise RequestError("'logprobs': served by the HTTP API, not by generate", "logprobs")
        except RequestError as e:
            records[n] = {"line": n, "error": {"message": f"line {n}: {e.message}", "param": e.param}}
    log.info("%d requests, %d refused", len(requests), len(records))
    for n, res in run_batch(engine, tokenizer, requests, progress=True).items():
        records[n] = {"line": n, **res}
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    with out:
        for n in sorted(records):
            out.write(json.dumps(records[n], ensure_ascii=False) + "\n")
    return 1 if len(records) and not requests else 0
