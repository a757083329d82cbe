"""`pd-local bench` and `pd-local bench sweep` flags: their types (each refuses a bad value with a
message for the user), the parser, and the cross-option checks that yield a WorkloadConfig."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from pd_local.loadtest.metrics import DEFAULT_PERCENTILES, parse_slo
from pd_local.loadtest.sweep import Target, parse_target
from pd_local.loadtest.workloads import PHASES, WorkloadConfig, WorkloadError, load_jsonl

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_NUM_PROMPTS = 100


# ---- argument types: each raises ArgumentTypeError with a message for the user ----------------

def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'inf')") from None
    if math.isnan(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"{text}: the rate must be > 0 (or 'inf')")
    return rate


def _rates(text: str) -> list[float]:
    rates = [_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise argparse.ArgumentTypeError("no rates given (e.g. --rates 1,2,4)")
    if any(math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError("sweep rates must be finite")
    return sorted(set(rates))


def _number(kind: type, ok: Callable[[Any], bool], must: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` (int or float) that `ok` accepts, else "TEXT: must be MUST"."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{text}: must be {must}")
        return x
    return parse


_positive_int = _number(int, lambda n: n >= 1, ">= 1")
_nonneg_int = _number(int, lambda n: n >= 0, ">= 0")
_nonneg_float = _number(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
_positive_float = _number(float, lambda x: math.isfinite(x) and x > 0, "a positive finite number")
_range_ratio = _number(float, lambda x: 0.0 <= x < 1.0, "in [0, 1)")
_fraction = _number(float, lambda x: 0.0 < x <= 1.0, "in (0, 1]")


def _slo(text: str) -> dict[str, float]:
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _phases(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(","))
    bad = [n for n in names if n not in PHASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"phases are {', '.join(PHASES)}; got {text!r}")
    return names


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 90,99") from None
    if not ps or not all(0 < p < 100 for p in ps):
        raise argparse.ArgumentTypeError(f"{text!r}: percentiles must be in (0, 100)")
    return ps


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return obj


def _target(text: str) -> Target:
    try:
        return parse_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- parsers ------------------------------------------------------------------------------------

def build_parser(sweep: bool) -> argparse.ArgumentParser:
    """The parser of `pd-local bench` (sweep=False) or `pd-local bench sweep`."""
    if sweep:
        p = argparse.ArgumentParser(
            prog="pd-local bench sweep",
            description="One benchmark run per (target, rate); SLO attainment and goodput vs "
                        "rate per target, and the goodput ratio at an attainment goal.")
        p.add_argument("--target", type=_target, action="append", required=True,
                       metavar="NAME=URL", help="a server under test (repeat for each)")
        p.add_argument("--rates", type=_rates, required=True, metavar="R1,R2,...",
                       help="request rates (req/s) to test, each a separate run")
        p.add_argument("--attainment", type=_fraction, default=0.9,
                       help="SLO attainment goal for the goodput comparison (default 0.9)")
        p.add_argument("--output-dir", type=Path, default=Path("bench-sweep"),
                       help="where sweep.json, sweep.md, sweep.png and runs/ go")
        p.add_argument("--no-plot", action="store_true", help="skip sweep.png")
    else:
        p = argparse.ArgumentParser(
            prog="pd-local bench",
            description="Load-test an OpenAI-compatible server with streamed requests. "
                        "`pd-local bench sweep --help` for rate sweeps.")
        p.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="server root (default http://127.0.0.1:8000)")
        p.add_argument("--request-rate", type=_rate, default=math.inf,
                       help="mean arrivals per second; inf (default) sends all at once")
        p.add_argument("--result-file", type=Path, help="write the result JSON here")
        p.add_argument("--plot", type=Path, metavar="DIR",
                       help="write ttft.png, itl.png, timeline.png into DIR (needs matplotlib)")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/chat/completions")
    p.add_argument("--model", help="model name to send (default: first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=("random", "jsonl", "interference", "multiturn",
                                          "head_of_line", "shifting"),
                   help="default: jsonl with --dataset, random otherwise")
    g.add_argument("--dataset", type=Path, metavar="FILE",
                   help="JSONL: {prompt | messages, output_len?} per line")
    g.add_argument("--input-len", type=_positive_int, default=256,
                   help="random prompt length in words (~tokens; default 256)")
    g.add_argument("--output-len", type=_positive_int, default=128,
                   help="max_tokens (default 128; also the dataset default)")
    g.add_argument("--range-ratio", type=_range_ratio, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0)")
    g.add_argument("--long-input-len", type=_positive_int, default=4096,
                   help="interference, shifting: long prompt length in words (default 4096)")
    g.add_argument("--long-output-len", type=_positive_int, default=16,
                   help="interference, shifting: long prompt's max_tokens (default 16)")
    g.add_argument("--long-every", type=_positive_float, default=5.0, metavar="T",
                   help="interference: a long prompt at T, 2T, ... seconds; head_of_line: "
                        "baseline chats at T, long prompts at 2T, 3T, ... (default 5)")
    g.add_argument("--turns", type=_positive_int, default=3,
                   help="multiturn: turns per conversation (default 3)")
    g.add_argument("--think-time", type=_nonneg_float, default=1.0, metavar="S",
                   help="multiturn: seconds between an answer and the next turn (default 1)")
    g.add_argument("--system-len", type=_nonneg_int, default=0,
                   help="multiturn: system prompt length in words (~tokens; default 0, none)")
    g.add_argument("--system-prompt", choices=("shared", "per-conversation"), default="shared",
                   help="multiturn: one system prompt for all conversations (default) or one each")
    sh = p.add_argument_group("shifting workload (docs/loadtest.md)")
    sh.add_argument("--phases", type=_phases, default=PHASES, metavar="P1,P2,...",
                   help=f"phases in turn, each of {', '.join(PHASES)}: long prompts with short "
                        "answers (--long-input-len, --long-output-len), short prompts with long "
                        "answers (--input-len, --output-len), or both (default "
                        f"{','.join(PHASES)})")
    sh.add_argument("--phase-duration", type=_positive_float, default=30.0, metavar="S",
                   help="seconds per phase (default 30)")
    h = p.add_argument_group("head_of_line workload (docs/loadtest.md)")
    h.add_argument("--streams", type=_nonneg_int, default=1,
                   help="steady streams decoding from the start (default 1)")
    h.add_argument("--stream-output-len", type=_positive_int, default=1024,
                   help="each stream's max_tokens (default 1024); the streams are ended "
                        "once every other request has finished, so this is only a cap")
    h.add_argument("--num-longs", type=_positive_int, default=1,
                   help="long prompts, one every --long-every seconds (default 1)")
    h.add_argument("--shorts-per-long", type=_positive_int, default=3,
                   help="short chats sent together behind each long prompt, and as the "
                        "baseline (default 3)")
    h.add_argument("--short-delay", type=_nonneg_float, default=0.3, metavar="S",
                   help="seconds from a long prompt to its short chats (default 0.3)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true so outputs are exactly max_tokens long")
    g.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                   help="JSON object merged into every request body")
    t = p.add_argument_group("load")
    t.add_argument("--num-prompts", type=_positive_int,
                   help=f"requests to send (default {DEFAULT_NUM_PROMPTS} unless --duration)")
    t.add_argument("--duration", type=_positive_float, metavar="S",
                   help="stop sending after S seconds (with --num-prompts: whichever first)")
    t.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier")
    t.add_argument("--max-concurrency", type=_positive_int,
                   help="at most this many requests in flight")
    t.add_argument("--warmup", type=_nonneg_int, default=0, metavar="N",
                   help="send N untimed requests first")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="seconds allowed per request, whole stream (default 300)")
    m = p.add_argument_group("metrics")
    m.add_argument("--slo", type=_slo, metavar="ttft=MS,tpot=MS,e2el=MS",
                   help="a request is good if it meets every bound given"
                        + (" (required)" if sweep else ""))
    m.add_argument("--percentiles", type=_percentiles, default=DEFAULT_PERCENTILES,
                   metavar="90,99", help="percentiles to report (default 90,99)")
    m.add_argument("--save-detailed", action="store_true",
                   help="add per-request arrays to the result JSON")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, rates: Sequence[float]
               ) -> WorkloadConfig:
    """Cross-option checks (p.error exits with code 2); returns the workload config."""
    name = args.workload or ("jsonl" if args.dataset else "random")
    if name == "jsonl":
        if args.dataset is None:
            p.error("--workload jsonl needs --dataset FILE")
        if not args.dataset.is_file():
            p.error(f"--dataset: no such file: {args.dataset}")
        try:
            load_jsonl(args.dataset, args.output_len)
        except WorkloadError as e:
            p.error(str(e))
    elif args.dataset is not None:
        p.error(f"--dataset is only read by --workload jsonl (got --workload {name})")
    if name == "multiturn" and args.endpoint != ENDPOINTS[0]:
        p.error("--workload multiturn sends message histories: use --endpoint "
                "/v1/chat/completions")
    if name == "head_of_line":
        if args.num_prompts is not None or args.duration is not None:
            p.error("--workload head_of_line sends a fixed schedule: --num-prompts and "
                    "--duration do not apply (see --num-longs, --long-every)")
        if args.range_ratio > 0:
            p.error("--workload head_of_line compares short chats of equal length: "
                    "--range-ratio must be 0")
        if args.short_delay >= args.long_every:
            p.error(f"--short-delay ({args.short_delay:g} s) must be shorter than "
                    f"--long-every ({args.long_every:g} s)")
    for rate in rates:
        if math.isinf(rate) and args.duration is not None and args.max_concurrency is None:
            p.error("--duration with --request-rate inf needs --max-concurrency "
                    "(otherwise requests would be sent without bound)")
        if math.isinf(rate) and name in ("interference", "shifting"):
            p.error(f"--workload {name} needs a finite --request-rate")
    if name == "shifting" and (args.num_prompts is not None or args.duration is not None):
        p.error("--workload shifting runs --phase-duration per phase: --num-prompts and "
                "--duration do not apply")
    return WorkloadConfig(name=name, input_len=args.input_len, output_len=args.output_len,
                          range_ratio=args.range_ratio, dataset=args.dataset,
                          long_input_len=args.long_input_len,
                          long_output_len=args.long_output_len, long_every=args.long_every,
                          turns=args.turns, think_time=args.think_time,
                          system_len=args.system_len,
                          shared_system=args.system_prompt == "shared",
                          streams=args.streams, stream_output_len=args.stream_output_len,
                          num_longs=args.num_longs, shorts_per_long=args.shorts_per_long,
                          short_delay=args.short_delay, phases=args.phases,
                          phase_duration=args.phase_duration)
