"""What the load test sends, and when: a workload is a (possibly endless) iterator of
`Scheduled(offset, spec)`, offsets non-decreasing; the workloads are in docs/loadtest.md. A
random prompt of n "tokens" is n words of `WORDS`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# One token each after a space in the usual BPE vocabularies: n words must stay n tokens.
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "out", "up", "into", "do",
    "than", "time", "some", "could", "them", "other", "new", "what", "then", "only", "about",
    "its", "may", "first", "any", "like", "now", "my", "such", "over", "also", "most", "made",
    "after", "many", "before", "must", "through", "back", "years", "where", "much", "your",
    "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work",
    "long", "here", "get", "both", "between", "life", "being", "under", "never", "day", "same",
    "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come",
    "since", "against", "go", "came", "right", "used", "take", "three", "water", "house",
)

KIND_DEFAULT = "request"
KIND_SHORT = "short"
KIND_LONG = "long"
KIND_STREAM = "stream"  # head_of_line: the steady streams decoding through the whole run
KIND_BASELINE = "baseline"  # head_of_line: the short chats sent before any long prompt
PHASES: tuple[str, ...] = ("prefill", "decode", "mixed")  # shifting: kinds "phase N: name"


class WorkloadError(ValueError):
    """A workload cannot be built from the given options or dataset (a user error)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request's content: `prompt` or `messages` (one of them after `for_endpoint`), and
    `input_len`, the client's estimate of its prompt tokens (words)."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    input_len: int
    output_len: int
    kind: str = KIND_DEFAULT

    def for_endpoint(self, chat: bool) -> RequestSpec:
        """Return the spec in the shape the endpoint takes (a prompt becomes one user message)."""
        if chat and self.messages is None:
            return RequestSpec(None, [{"role": "user", "content": self.prompt or ""}],
                               self.input_len, self.output_len, self.kind)
        if not chat and self.prompt is None:
            raise WorkloadError("a dataset entry has `messages`, but /v1/completions takes a "
                                "`prompt`: use --endpoint /v1/chat/completions")
        return self


@dataclass(frozen=True)
class Scheduled:
    """A request and its send time, `offset` seconds after the timed run starts."""

    offset: float
    spec: RequestSpec


@dataclass(frozen=True)
class WorkloadConfig:
    """Options that define the requests (not the timing), validated by the CLI."""

    name: str = "random"  # random | jsonl | interference | multiturn | head_of_line
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    dataset: Path | None = None
    long_input_len: int = 4096
    long_output_len: int = 16
    long_every: float = 5.0
    turns: int = 3  # multiturn (conversation.py)
    think_time: float = 1.0
    system_len: int = 0
    shared_system: bool = True
    # head_of_line only (see `head_of_line_schedule`)
    streams: int = 1
    stream_output_len: int = 1024
    num_longs: int = 1
    shorts_per_long: int = 3
    short_delay: float = 0.3
    # shifting only: `phases` in turn, each `phase_duration` s (see `shifting_schedule`)
    phases: tuple[str, ...] = PHASES
    phase_duration: float = 30.0

    def phase_kind(self, i: int) -> str:
        return f"phase {i + 1}: {self.phases[i]}"


def random_words(rng: np.random.Generator, n: int) -> str:
    """`n` words from `WORDS`, space-separated (about `n` tokens)."""
    idx = rng.integers(0, len(WORDS), size=n)
    return " ".join(WORDS[i] for i in idx)


def spread(rng: np.random.Generator, mean: int, range_ratio: float) -> int:
    """A length drawn uniformly from [mean*(1-r), mean*(1+r)] (integers, at least 1)."""
    if range_ratio <= 0:
        return max(1, mean)
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    return int(rng.integers(lo, hi + 1))


def random_spec(rng: np.random.Generator, cfg: WorkloadConfig, kind: str = KIND_DEFAULT
                ) -> RequestSpec:
    """A random-words prompt with lengths from `cfg.input_len/output_len/range_ratio`."""
    n_in = spread(rng, cfg.input_len, cfg.range_ratio)
    n_out = spread(rng, cfg.output_len, cfg.range_ratio)
    return RequestSpec(random_words(rng, n_in), None, n_in, n_out, kind)


def long_spec(rng: np.random.Generator, cfg: WorkloadConfig) -> RequestSpec:
    """The interference workload's long prompt (exact lengths, no spread)."""
    return RequestSpec(random_words(rng, cfg.long_input_len), None, cfg.long_input_len,
                       cfg.long_output_len, KIND_LONG)


def load_jsonl(path: Path, default_output_len: int) -> list[RequestSpec]:
    """A dataset: a JSON object a line with `prompt` or `messages`, and optionally `output_len`;
    blank lines skipped, anything else a `WorkloadError` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"--dataset: cannot read {path}: {e.strerror or e}") from e
    specs: list[RequestSpec] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected a JSON object")
        out_len = obj.get("output_len", default_output_len)
        if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
            raise WorkloadError(f"{where}: output_len must be a positive integer")
        if isinstance(obj.get("prompt"), str):
            prompt = obj["prompt"]
            specs.append(RequestSpec(prompt, None, max(1, len(prompt.split())), out_len))
        elif isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                raise WorkloadError(f"{where}: each message needs a string `content`")
            n_in = sum(len(m["content"].split()) for m in msgs)
            specs.append(RequestSpec(None, msgs, max(1, n_in), out_len))
        else:
            raise WorkloadError(f"{where}: needs a string `prompt` or a list `messages`")
    if not specs:
        raise WorkloadError(f"--dataset: {path} holds no requests")
    return specs


def arrival_gaps(rng: np.random.Generator, rate: float, burstiness: float) -> Iterator[float]:
    """Endless inter-arrival times with mean `1/rate`: gamma(shape=burstiness,
    scale=1/(rate*burstiness)). burstiness 1 is a Poisson process; below 1 is burstier, above 1
    more regular. `rate = inf` gives zeros (everything at once)."""
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        # one numpy call per 256 arrivals
        yield from rng.gamma(burstiness, scale, size=256).tolist()


def arrival_offsets(rng: np.random.Generator, rate: float, burstiness: float,
                    num: int | None, duration: float | None) -> Iterator[float]:
    """Send offsets: the first at 0, then cumulative gaps; stops after `num` arrivals or at the
    first offset >= `duration` (whichever comes first; both None means endless)."""
    t = 0.0
    count = 0
    gaps = arrival_gaps(rng, rate, burstiness)
    while num is None or count < num:
        if duration is not None and t >= duration:
            return
        yield t
        count += 1
        t += next(gaps)


def make_schedule(cfg: WorkloadConfig, rate: float, burstiness: float, num: int | None,
                  duration: float | None, seed: int, chat: bool) -> Iterator[Scheduled]:
    """The timed run's requests, the same for a given seed; `num` counts short requests only
    (interference: a long prompt every `long_every` before the horizon)."""
    rng_time = np.random.default_rng([seed, 0])
    rng_text = np.random.default_rng([seed, 1])
    offsets = arrival_offsets(rng_time, rate, burstiness, num, duration)
    if cfg.name == "random":
        for off in offsets:
            yield Scheduled(off, random_spec(rng_text, cfg).for_endpoint(chat))
    elif cfg.name == "jsonl":
        assert cfg.dataset is not None
        data = [s.for_endpoint(chat) for s in load_jsonl(cfg.dataset, cfg.output_len)]
        for i, off in enumerate(offsets):
            yield Scheduled(off, data[i % len(data)])
    elif cfg.name == "interference":
        if math.isinf(rate):
            raise WorkloadError("the interference workload needs a finite --request-rate")
        shorts = list(offsets)  # finite: the CLI requires --num-prompts or --duration
        horizon = duration if duration is not None else (shorts[-1] if shorts else 0.0)
        longs = []
        k = 1
        while k * cfg.long_every < horizon:
            longs.append(k * cfg.long_every)
            k += 1
        events = sorted([(t, 0) for t in shorts] + [(t, 1) for t in longs])
        for t, is_long in events:
            spec = long_spec(rng_text, cfg) if is_long else random_spec(rng_text, cfg, KIND_SHORT)
            yield Scheduled(t, spec.for_endpoint(chat))
    elif cfg.name == "multiturn":
        raise WorkloadError("multiturn turns depend on earlier answers: schedule them with "
                            "conversation.make_conversations")
    elif cfg.name == "head_of_line":
        yield from head_of_line_schedule(cfg, seed, chat)
    elif cfg.name == "shifting":
        yield from shifting_schedule(cfg, rate, burstiness, seed, chat)
    else:
        raise WorkloadError(f"unknown workload {cfg.name!r}")


def head_of_line_schedule(cfg: WorkloadConfig, seed: int, chat: bool) -> Iterator[Scheduled]:
    """Fixed times: `streams` streams at 0, a baseline of `shorts_per_long` short chats at
    `long_every`, then at (k + 1) * `long_every` a long prompt and, `short_delay` later, its
    short chats. Every prompt has its own words (docs/loadtest.md)."""
    rng = np.random.default_rng([seed, 1])
    stream_cfg = WorkloadConfig(input_len=cfg.input_len, output_len=cfg.stream_output_len)
    short_cfg = WorkloadConfig(input_len=cfg.input_len, output_len=cfg.output_len)  # exact
    for _ in range(cfg.streams):
        yield Scheduled(0.0, random_spec(rng, stream_cfg, KIND_STREAM).for_endpoint(chat))
    for _ in range(cfg.shorts_per_long):
        yield Scheduled(cfg.long_every,
                        random_spec(rng, short_cfg, KIND_BASELINE).for_endpoint(chat))
    for k in range(1, cfg.num_longs + 1):
        t = (k + 1) * cfg.long_every
        yield Scheduled(t, long_spec(rng, cfg).for_endpoint(chat))
        for _ in range(cfg.shorts_per_long):
            yield Scheduled(t + cfg.short_delay,
                            random_spec(rng, short_cfg, KIND_SHORT).for_endpoint(chat))


def shifting_schedule(cfg: WorkloadConfig, rate: float, burstiness: float, seed: int,
                      chat: bool) -> Iterator[Scheduled]:
    """Arrivals at `rate` through `phases`, each `phase_duration` s: "prefill" sends long prompts
    with short answers (long_input_len -> long_output_len), "decode" short prompts with long
    answers (input_len -> output_len), "mixed" either at random, half and half."""
    if math.isinf(rate):
        raise WorkloadError("the shifting workload needs a finite --request-rate")
    rng_text = np.random.default_rng([seed, 1])
    horizon = len(cfg.phases) * cfg.phase_duration
    for off in arrival_offsets(np.random.default_rng([seed, 0]), rate, burstiness, None, horizon):
        i = min(int(off // cfg.phase_duration), len(cfg.phases) - 1)
        name = cfg.phases[i]
        heavy_prefill = name == "prefill" or (name == "mixed" and rng_text.random() < 0.5)
        spec = long_spec(rng_text, cfg) if heavy_prefill else random_spec(rng_text, cfg)
        yield Scheduled(off, dataclasses.replace(spec, kind=cfg.phase_kind(i)).for_endpoint(chat))


def head_of_line_count(cfg: WorkloadConfig) -> int:
    """How many requests `head_of_line_schedule` sends."""
    return cfg.streams + cfg.shorts_per_long + cfg.num_longs * (1 + cfg.shorts_per_long)


def warmup_specs(cfg: WorkloadConfig, n: int, seed: int, chat: bool) -> list[RequestSpec]:
    """`n` requests like the run's own, from their own random stream (the run's stay the same)."""
    if n <= 0:
        return []
    if cfg.name == "jsonl":
        assert cfg.dataset is not None
        data = [s.for_endpoint(chat) for s in load_jsonl(cfg.dataset, cfg.output_len)]
        return [data[i % len(data)] for i in range(n)]
    rng = np.random.default_rng([seed, 2])
    return [random_spec(rng, cfg).for_endpoint(chat) for _ in range(n)]
