"""`pd-local bench` and `pd-local bench sweep` (flags: args.py). Exit codes: 0 the run finished
with a success, 1 it could not start or nothing succeeded, 2 bad arguments, 130 interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Sequence

from pd_local.loadtest.args import DEFAULT_NUM_PROMPTS, ENDPOINTS, build_parser, check_args
from pd_local.loadtest.client import RequestOptions
from pd_local.loadtest.conversation import per_turn, run_multiturn
from pd_local.loadtest.head_of_line import (HeadOfLineError, format_head_of_line,
                                            head_of_line_report)
from pd_local.loadtest.metrics import summarize
from pd_local.loadtest.progress import ProgressBar
from pd_local.loadtest.report import format_modes, format_table, json_number, result_json, write_json
from pd_local.loadtest.runner import BenchError, RunOptions, RunResult, fetch_model, run_benchmark
from pd_local.loadtest.sweep import SweepCollector, sweep_json, sweep_markdown
from pd_local.loadtest.workloads import (
    WorkloadConfig, WorkloadError, head_of_line_count, make_schedule, warmup_specs,
)

log = logging.getLogger(__name__)


def _num_prompts(args: argparse.Namespace, wl: WorkloadConfig) -> int | None:
    if wl.name == "head_of_line":
        return head_of_line_count(wl)
    if wl.name == "shifting":
        return None  # as many as arrive in its phases
    if args.num_prompts is None and args.duration is None:
        return DEFAULT_NUM_PROMPTS
    return args.num_prompts


def _meta(args: argparse.Namespace, wl: WorkloadConfig, base_url: str, model: str,
          rate: float, issued: int, run_results: Sequence[Any] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "endpoint_type": "openai-chat" if args.endpoint == ENDPOINTS[0] else "openai",
        "base_url": base_url, "endpoint": args.endpoint, "model_id": model,
        "workload": wl.name, "num_prompts": issued, "request_rate": json_number(rate),
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "duration_limit": args.duration, "warmup": args.warmup, "seed": args.seed,
        "ignore_eos": args.ignore_eos, "slo_ms": args.slo,
        "percentiles": list(args.percentiles),
    }
    if wl.name == "jsonl":
        meta["dataset"] = str(wl.dataset)
    else:
        meta.update(input_len=wl.input_len, output_len=wl.output_len, range_ratio=wl.range_ratio)
    if wl.name in ("interference", "head_of_line"):
        meta.update(long_input_len=wl.long_input_len, long_output_len=wl.long_output_len,
                    long_every=wl.long_every)
    if wl.name == "multiturn":
        meta.update(turns=wl.turns, think_time=wl.think_time, system_len=wl.system_len,
                    system_prompt="shared" if wl.shared_system else "per-conversation",
                    num_conversations=len({r.conversation for r in run_results}))
    if wl.name == "shifting":
        meta.update(long_input_len=wl.long_input_len, long_output_len=wl.long_output_len,
                    phases=list(wl.phases), phase_duration=wl.phase_duration)
    if wl.name == "head_of_line":
        meta.update(streams=wl.streams, stream_output_len=wl.stream_output_len,
                    num_longs=wl.num_longs, shorts_per_long=wl.shorts_per_long,
                    short_delay=wl.short_delay)
    return meta


def _resolve_model(args: argparse.Namespace, base_url: str) -> str:
    if args.model:
        return str(args.model)
    return asyncio.run(fetch_model(base_url, args.api_key, min(args.timeout, 30.0)))


def _run_once(args: argparse.Namespace, wl: WorkloadConfig, base_url: str, model: str,
              rate: float) -> tuple[dict[str, Any], dict[str, Any], RunResult]:
    """One benchmark run; returns (meta, summary, run)."""
    chat = args.endpoint == ENDPOINTS[0]
    num = _num_prompts(args, wl)
    schedule = make_schedule(wl, rate, args.burstiness, num, args.duration, args.seed, chat)
    opts = RunOptions(
        request=RequestOptions(url=base_url.rstrip("/") + args.endpoint, model=model, chat=chat,
                               api_key=args.api_key, ignore_eos=args.ignore_eos,
                               timeout=args.timeout, extra_body=args.extra_body),
        max_concurrency=args.max_concurrency, duration=args.duration, watch_modes=wl.name == "shifting")
    if wl.name == "multiturn":
        run = asyncio.run(run_multiturn(wl, opts, rate, args.burstiness, num, args.duration,
                                        args.seed, args.warmup, not args.quiet))
        summary = summarize(run.results, run.duration, args.slo, args.percentiles)
        summary["per_turn"] = per_turn(run.results)
        return _meta(args, wl, base_url, model, rate, len(run.results), run.results), summary, run
    phases = {wl.phase_kind(i): wl.phase_duration for i in range(len(wl.phases))} \
        if wl.name == "shifting" else None
    horizon = len(wl.phases) * wl.phase_duration if phases else args.duration
    progress = ProgressBar(num, horizon, enabled=not args.quiet)
    run = asyncio.run(run_benchmark(schedule, opts, warmup_specs(wl, args.warmup, args.seed, chat),
                                    progress))
    summary = summarize(run.results, run.duration, args.slo, args.percentiles, phases)
    return _meta(args, wl, base_url, model, rate, len(run.results)), summary, run


def bench_main(argv: list[str]) -> int:
    p = build_parser(sweep=False)
    args = p.parse_args(argv)
    wl = check_args(p, args, [args.request_rate])
    if args.plot is not None:
        from pd_local.loadtest.plots import PlotUnavailable, require_matplotlib
        try:
            require_matplotlib()
        except PlotUnavailable as e:
            p.error(f"--plot: {e}")
    try:
        model = _resolve_model(args, args.base_url)
        meta, summary, run = _run_once(args, wl, args.base_url, model, args.request_rate)
    except (BenchError, WorkloadError) as e:
        print(f"pd-local bench: {e}", file=sys.stderr)
        return 1
    print(format_table(meta, summary, args.percentiles))
    if run.modes:
        print(format_modes(run.modes, run.duration))
    extra: dict[str, Any] = {}
    if wl.name == "head_of_line":
        try:
            extra["head_of_line"] = head_of_line_report(run.results)
        except HeadOfLineError as e:
            print(f"pd-local bench: {e}", file=sys.stderr)
            return 1
        print(format_head_of_line(extra["head_of_line"]))
    if args.result_file is not None:
        write_json(args.result_file,
                   {**result_json(meta, summary, run, args.save_detailed), **extra})
        print(f"result: {args.result_file}")
    if args.plot is not None:
        from pd_local.loadtest.plots import plot_run
        for path in plot_run(run, args.plot):
            print(f"plot: {path}")
    return 0 if summary["completed"] > 0 else 1


def sweep_main(argv: list[str]) -> int:
    p = build_parser(sweep=True)
    args = p.parse_args(argv)
    if args.slo is None:
        p.error("sweep needs --slo (attainment is measured against it)")
    names = [t.name for t in args.target]
    if len(set(names)) != len(names):
        p.error(f"--target names must be unique (got {', '.join(names)})")
    if args.workload == "head_of_line":
        p.error("--workload head_of_line has fixed times, not rates: run it with `pd-local "
                "bench` against each target")
    wl = check_args(p, args, args.rates)
    if not args.no_plot:
        from pd_local.loadtest.plots import PlotUnavailable, require_matplotlib
        try:
            require_matplotlib()
        except PlotUnavailable as e:
            p.error(f"the sweep plot: {e}; or pass --no-plot")
    collector = SweepCollector(args.target, args.rates, args.attainment, args.slo)
    out = args.output_dir
    try:
        models = {t.name: _resolve_model(args, t.base_url) for t in args.target}
        # Rate-major order: a drift of the host over time then affects every target alike.
        for rate in args.rates:
            for t in args.target:
                meta, summary, run = _run_once(args, wl, t.base_url, models[t.name], rate)
                path = out / "runs" / f"{t.name}_rate{rate:g}.json"
                write_json(path, result_json(meta, summary, run, args.save_detailed))
                collector.add(t, rate, summary, str(path))
                if not args.quiet:
                    att = summary["slo_attainment"]
                    print(f"[{t.name}] rate {rate:g} req/s: attainment "
                          f"{'-' if att is None else f'{100 * att:.1f}%'}, goodput "
                          f"{summary['request_goodput'] or 0:.2f} req/s, "
                          f"{summary['failed']} failed", file=sys.stderr)
    except (BenchError, WorkloadError) as e:
        print(f"pd-local bench sweep: {e}", file=sys.stderr)
        return 1
    data = sweep_json(collector)
    write_json(out / "sweep.json", data)
    md = sweep_markdown(data)
    (out / "sweep.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"results: {out / 'sweep.json'}, {out / 'sweep.md'}")
    if not args.no_plot:
        from pd_local.loadtest.plots import plot_sweep
        print(f"plot: {plot_sweep(data, out / 'sweep.png')}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `pd-local bench [sweep] ...`; returns the exit code (module docstring)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="pd-local bench: %(message)s")
    try:
        if argv and argv[0] == "sweep":
            return sweep_main(argv[1:])
        return bench_main(argv)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("pd-local bench: interrupted", file=sys.stderr)
        return 130
