"""ServeConfig: the one frozen config tree of a `pd-local serve` run, built alike on every rank
from a TOML file (`configs/`) plus flags (config_flags.py). `__post_init__` checks that it is
coherent by itself; `check_world` that it fits the world torchrun started."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pd_local.model.config import ModelConfig, ModelConfigError

DEFAULT_MODEL = "weights/smollm2-135m-instruct"
API_KEY_ENV = "PD_LOCAL_API_KEY"
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32")
DEVICES: tuple[str, ...] = ("cpu", "cuda")
TRANSFER_MODES: tuple[str, ...] = ("layerwise", "whole")
ROUTING_POLICIES: tuple[str, ...] = ("load", "round_robin", "prefix")  # cluster/placement.py
PREFILL_POLICIES: tuple[str, ...] = ("fcfs", "srpf")  # engine/prefill_queue.py
DEFAULT_PREFILL_POLICY = "srpf"  # the one default, for the engine and every constructor below it
DEFAULT_MAX_PASSED_TOKENS = 4096  # srpf's aging bound
DEFAULT_KV_CACHE_GB = 1.0
DEFAULT_GPU_MEMORY_FRACTION = 0.85


class ConfigError(ValueError):
    """A config we refuse; the message names the field (dotted, as in the TOML) and the value."""


def _int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    # bool is an int subclass: `port = true` must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")


def _positive_float(name: str, value: Any, maximum: float | None = None,
                    allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                          f"got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class TopologyConfig:
    """One of: `prefill` + `decode` (disaggregated), `colocated` (N replicas) or `elastic` (N
    workers, each prefilling and decoding for itself or the others, placed per request). Each is
    an instance of `tp` ranks (tensor parallel; prefill_tp / decode_tp: one role's, 0 = tp)."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    elastic: int = 0
    tp: int = 1
    prefill_tp: int = 0
    decode_tp: int = 0

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "colocated", "elastic", "prefill_tp", "decode_tp"):
            _int(f"topology.{name}", getattr(self, name), minimum=0)
        _int("topology.tp", self.tp, minimum=1)
        got = f"(got prefill={self.prefill}, decode={self.decode}, colocated={self.colocated}, elastic={self.elastic})"
        if bool(self.prefill or self.decode) + bool(self.colocated) + bool(self.elastic) > 1:
            raise ConfigError(f"topology: set one of prefill + decode, colocated or elastic {got}")
        if not (self.colocated or self.elastic) and (self.prefill < 1 or self.decode < 1):
            raise ConfigError(f"topology needs prefill >= 1 and decode >= 1, colocated >= 1 or "
                              f"elastic >= 1 {got}")
        if (self.prefill_tp or self.decode_tp) and not self.prefill:
            raise ConfigError(f"topology.prefill_tp / decode_tp size prefill and decode instances; "
                              f"{self.label} takes topology.tp (got prefill_tp={self.prefill_tp}, "
                              f"decode_tp={self.decode_tp})")
        if max(self.tp_sizes) > 1 and self.elastic:
            raise ConfigError(f"tensor parallel is served by colocated and prefill/decode instances so far, "
                              f"not {self.label}: migration between TP instances is not built yet")

    @property
    def is_colocated(self) -> bool:
        return self.colocated > 0

    @property
    def tp_sizes(self) -> tuple[int, ...]:  # ranks per instance: (prefill's, decode's) or (tp,)
        return (self.prefill_tp or self.tp, self.decode_tp or self.tp) if self.prefill else (self.tp,)

    @property
    def instances(self) -> int:  # prefill + decode, or colocated / elastic
        return self.colocated or self.elastic or self.prefill + self.decode

    @property
    def num_workers(self) -> int:
        p, d = self.tp_sizes[0], self.tp_sizes[-1]
        return self.prefill * p + self.decode * d if self.prefill else self.instances * self.tp

    @property
    def world_size(self) -> int:
        """Ranks torchrun must start: rank 0 (front-end + router) plus one per worker."""
        return 1 + self.num_workers

    @property
    def label(self) -> str:
        tp = "" if max(self.tp_sizes) == 1 else "-tp" + "/".join(map(str, dict.fromkeys(self.tp_sizes)))
        if self.colocated:
            return f"colocated-{self.colocated}{tp}"
        return (f"elastic-{self.elastic}" if self.elastic else f"{self.prefill}P{self.decode}D") + tp

    @property
    def workers(self) -> str:
        """The worker ranks in words, for error messages."""
        pd = ((self.prefill, "prefill", self.tp_sizes[0]), (self.decode, "decode", self.tp_sizes[-1]))
        return " + ".join(f"{n} {what}" + (f" instances of {k} ranks" if k > 1 else "") for n, what, k in (
            pd if self.prefill else [(self.instances, "colocated" if self.colocated else "elastic", self.tp)]))


@dataclass(frozen=True)
class EngineConfig:
    """The `[engine]` table, and what `Engine` takes. KV memory: one of kv_cache_gb /
    gpu_memory_fraction, or (code only) `num_blocks`; `max_model_len=None` (code only): the
    model's max_position_embeddings."""

    block_size: int = 16
    kv_cache_gb: float | None = None
    gpu_memory_fraction: float | None = None
    max_num_seqs: int = 64
    max_prefill_tokens: int = 256  # prompt tokens per forward (docs/benchmarks/engine-settings.md)
    max_model_len: int | None = 2048
    chunked_prefill: bool = True
    prefill_policy: str = DEFAULT_PREFILL_POLICY  # or "fcfs"
    cuda_graphs: bool = True  # CUDA only
    batch_invariant: bool = True  # false: faster on CPU, logits may depend on the batch
    enable_prefix_caching: bool = True
    threads: int = 0  # CPU threads per worker rank; 0: its share of the cores (engine/threads.py)
    native_linear: bool | str = "auto"  # CPU decode rows in model/native_linear.c; auto: RAM allowing
    num_blocks: int | None = field(default=None, metadata={"toml": False})

    def __post_init__(self) -> None:
        _bool("engine.batch_invariant", self.batch_invariant)
        if self.native_linear not in (True, False, "auto"):
            raise ConfigError(f'engine.native_linear must be true, false or "auto", got {self.native_linear!r}')
        _int("engine.block_size", self.block_size, minimum=1, maximum=1024)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"engine.block_size must be a power of two, got {self.block_size}")
        both = self.kv_cache_gb is not None and self.gpu_memory_fraction is not None
        neither = self.kv_cache_gb is None and self.gpu_memory_fraction is None
        if both or (neither and self.num_blocks is None):
            raise ConfigError(
                "engine: set exactly one of kv_cache_gb and gpu_memory_fraction "
                f"(got kv_cache_gb={self.kv_cache_gb}, "
                f"gpu_memory_fraction={self.gpu_memory_fraction})"
            )
        if self.kv_cache_gb is not None:
            _positive_float("engine.kv_cache_gb", self.kv_cache_gb)
        if self.gpu_memory_fraction is not None:
            _positive_float("engine.gpu_memory_fraction", self.gpu_memory_fraction, maximum=1.0)
        _int("engine.max_num_seqs", self.max_num_seqs, minimum=1)
        _int("engine.threads", self.threads, minimum=0, maximum=4096)
        _int("engine.max_prefill_tokens", self.max_prefill_tokens, minimum=1)
        _bool("engine.enable_prefix_caching", self.enable_prefix_caching)
        _bool("engine.chunked_prefill", self.chunked_prefill)
        _choice("engine.prefill_policy", self.prefill_policy, PREFILL_POLICIES)
        if self.max_model_len is not None:
            _int("engine.max_model_len", self.max_model_len, minimum=1)
        if self.num_blocks is not None:
            _int("engine.num_blocks", self.num_blocks, minimum=1)
        _bool("engine.cuda_graphs", self.cuda_graphs)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    cors_origins: tuple[str, ...] = ()
    shutdown_grace_s: float = 5.0  # on SIGTERM, in-flight requests' time to finish

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"server.host must be a non-empty string, got {self.host!r}")
        _int("server.port", self.port, minimum=1, maximum=65535)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError(
                f"server.api_key must be a non-empty string (omit it for no key), "
                f"got {self.api_key!r}"
            )
        _int("server.max_queue", self.max_queue, minimum=1)
        _positive_float("server.shutdown_grace_s", self.shutdown_grace_s, allow_zero=True)
        if not isinstance(self.cors_origins, tuple) or not all(
            isinstance(o, str) and o for o in self.cors_origins
        ):
            raise ConfigError(
                "server.cors_origins must be a list of non-empty strings, "
                f"got {self.cors_origins!r}"
            )


@dataclass(frozen=True)
class TimeoutConfig:
    """group_s: every process group's timeout; heartbeats every `heartbeat_s` keep idle links
    alive (an idle gloo recv fails at the timeout)."""

    group_s: float = 60.0

    def __post_init__(self) -> None:
        _positive_float("timeouts.group_s", self.group_s)
        if self.group_s < 1:
            raise ConfigError(
                f"timeouts.group_s must be >= 1 (heartbeats need room), got {self.group_s}")

    @property
    def heartbeat_s(self) -> float:
        return self.group_s / 4


@dataclass(frozen=True)
class SloConfig:
    """What elastic placement aims for (docs/architecture.md, Elastic workers): time to first
    token, time per output token; tpot_budget: cut prompt chunks to keep decode steps within
    tpot_ms (off: it cost goodput, docs/benchmarks/elastic.md)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    tpot_budget: bool = False

    def __post_init__(self) -> None:
        _positive_float("slo.ttft_ms", self.ttft_ms)
        _positive_float("slo.tpot_ms", self.tpot_ms)
        _bool("slo.tpot_budget", self.tpot_budget)


@dataclass(frozen=True)
class ModesConfig:
    """How elastic ranks' modes follow the measured work (cluster/modes.py): the work rates'
    averaging time, how long a new split must be wanted, the least time between flips."""

    rate_tau_s: float = 5.0
    confirm_s: float = 4.0
    dwell_s: float = 5.0

    def __post_init__(self) -> None:
        _positive_float("modes.rate_tau_s", self.rate_tau_s)
        _positive_float("modes.confirm_s", self.confirm_s, allow_zero=True)
        _positive_float("modes.dwell_s", self.dwell_s, allow_zero=True)


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "cpu"
    transfer: str = "layerwise"  # or "whole": one tensor after prefill
    routing: str = "load"
    share_device: bool = False  # CUDA: worker ranks may share GPUs
    kv_ipc: bool = True  # CUDA: a pair on one GPU moves KV through CUDA IPC, not host memory
    topology: TopologyConfig = field(default_factory=lambda: TopologyConfig(prefill=1, decode=1))
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(kv_cache_gb=DEFAULT_KV_CACHE_GB)
    )
    server: ServerConfig = field(default_factory=ServerConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a non-empty path, got {self.model!r}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("transfer", self.transfer, TRANSFER_MODES)
        _choice("routing", self.routing, ROUTING_POLICIES)
        _bool("share_device", self.share_device)
        _bool("kv_ipc", self.kv_ipc)
        if self.device == "cpu" and self.engine.gpu_memory_fraction is not None:
            raise ConfigError(
                "engine.gpu_memory_fraction applies to device = 'cuda' only; "
                f"on cpu set engine.kv_cache_gb (got gpu_memory_fraction="
                f"{self.engine.gpu_memory_fraction})"
            )
        if self.share_device and self.device != "cuda":
            raise ConfigError("share_device = true applies to device = 'cuda' only")

    @property
    def model_path(self) -> Path:
        return Path(self.model)


# --- building from TOML + overrides -------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "topology": TopologyConfig,
    "engine": EngineConfig,
    "server": ServerConfig,
    "timeouts": TimeoutConfig,
    "slo": SloConfig,
    "modes": ModesConfig,
}


def _known(cls: type) -> list[str]:
    """The keys a TOML table (or --set) may give: the fields not marked `toml: False`."""
    return [f.name for f in fields(cls) if f.metadata.get("toml", True)]


def _check_keys(where: str, raw: Mapping[str, Any], cls: type) -> None:
    known = _known(cls)
    for key in raw:
        if key not in known:
            dotted = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key {dotted!r} (known: {', '.join(known)})")


def build_config(raw: Mapping[str, Any]) -> ServeConfig:
    """Build and validate a ServeConfig from a TOML-shaped dict (tables for the sections)."""
    _check_keys("", raw, ServeConfig)
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a table ([{key}]), got {value!r}")
            _check_keys(key, value, _SECTIONS[key])
        else:
            top[key] = value
    device = raw.get("device", "cpu")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = dict(raw.get(name, {}))
        if name == "topology" and not {"prefill", "decode", "colocated", "elastic"} & table.keys():
            table = {"prefill": 1, "decode": 1} | table
        if name == "engine" and "kv_cache_gb" not in table and "gpu_memory_fraction" not in table:
            # The default depends on the device, so it is resolved here, not in the dataclass.
            if device == "cuda":
                table["gpu_memory_fraction"] = DEFAULT_GPU_MEMORY_FRACTION
            else:
                table["kv_cache_gb"] = DEFAULT_KV_CACHE_GB
        if name == "server" and "cors_origins" in table:
            origins = table["cors_origins"]
            table["cors_origins"] = tuple(origins) if isinstance(origins, list) else origins
        sections[name] = cls(**table)  # keys already checked: no TypeError
    return ServeConfig(**top, **sections)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys ('engine.max_num_seqs') replace one value; 'topology' replaces the table."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            if section not in _SECTIONS:
                raise ConfigError(f"unknown key {key!r} (sections: {', '.join(_SECTIONS)})")
            table = merged.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section} must be a table ([{section}]), got {table!r}")
            table[name] = value
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ServeConfig:
    """Read `path` (None: the built-in defaults, identical to configs/cpu-1p1d.toml), apply the
    overrides (dotted keys, None values ignored) and validate. Errors name the file."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return build_config(_merge(raw, overrides or {}))
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


# --- start-up checks against the world torchrun made --------------------------------------------


def check_world(cfg: ServeConfig, world_size: int, cuda_device_count: int, per_node: int | None = None) -> None:
    """Refuse a world that cannot run `cfg`, with the numbers in the message (every rank before
    init_process_group, and `pd-local serve` before torchrun). per_node: ranks a host (all)."""
    topo = cfg.topology
    if world_size != topo.world_size:
        raise ConfigError(
            f"topology {topo.label} needs {topo.world_size} ranks (1 front-end + "
            f"{topo.num_workers} workers: {topo.workers}), torchrun started {world_size}"
        )
    if cfg.device == "cuda":
        if cuda_device_count < 1:
            raise ConfigError("device = 'cuda' but no CUDA device is visible "
                              "(torch.cuda.device_count() == 0)")
        workers = min(topo.num_workers, per_node or world_size)  # on the busiest host
        if workers > cuda_device_count and not cfg.share_device:
            raise ConfigError(
                f"topology {topo.label} has {workers} worker ranks on a host but only "
                f"{cuda_device_count} CUDA device(s) are visible; NCCL refuses two ranks on one "
                "GPU (set share_device = true to share GPUs and move KV through host memory)"
            )


def check_model_dir(cfg: ServeConfig) -> ModelConfig:
    """The model directory exists, is a supported architecture, and covers max_model_len."""
    path = cfg.model_path
    if not path.is_dir():
        raise ConfigError(
            f"model directory {path} not found (model = {cfg.model!r}; "
            "`pd-local weights fetch` downloads the default model)"
        )
    try:
        model = ModelConfig.from_dir(path)
    except ModelConfigError as e:
        raise ConfigError(f"model {path}: {e}") from None
    for tp in sorted(set(cfg.topology.tp_sizes) - {1}):
        try:
            model.check_tp(tp)
        except ModelConfigError as e:
            raise ConfigError(f"model {path}: {e} (topology {cfg.topology.label})") from None
    max_len = cfg.engine.max_model_len
    if max_len is not None and max_len > model.max_position_embeddings:
        raise ConfigError(
            f"engine.max_model_len = {cfg.engine.max_model_len} exceeds the model's "
            f"max_position_embeddings = {model.max_position_embeddings} ({path})"
        )
    return model
