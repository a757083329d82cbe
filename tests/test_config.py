"""config.py: the shipped configs load, flags override, and every refusal names the field and
the value (or, for the world checks, the numbers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pd_local.config import (ConfigError, EngineConfig, ServeConfig, check_model_dir, check_world,
                             load_config)
from pd_local.config_flags import add_config_args, config_from_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse(*argv: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("name, label, world, device", [
    ("cpu-1p1d", "1P1D", 3, "cpu"),
    ("cpu-colocated-2", "colocated-2", 3, "cpu"),
    ("cpu-elastic-2", "elastic-2", 3, "cpu"),
    ("cpu-1p2d", "1P2D", 4, "cpu"),
    ("gpu-1p1d", "1P1D", 3, "cuda"),
    ("gpu-2p2d", "2P2D", 5, "cuda"),
    ("gpu-1p3d", "1P3D", 5, "cuda"),
])
def test_shipped_configs(name: str, label: str, world: int, device: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.topology.label == label and cfg.topology.world_size == world
    assert cfg.device == device and cfg.model == "weights/smollm2-135m-instruct"
    if device == "cuda":
        assert cfg.engine.gpu_memory_fraction is not None and cfg.engine.kv_cache_gb is None
    else:
        assert cfg.engine.kv_cache_gb is not None and cfg.engine.gpu_memory_fraction is None
    assert cfg.timeouts.group_s < float("inf")


def test_defaults_are_cpu_1p1d() -> None:
    assert load_config(None) == load_config(CONFIGS / "cpu-1p1d.toml") == ServeConfig()


def test_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.dtype = "float32"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.engine.block_size = 32  # type: ignore[misc]


def test_flags_override_the_file() -> None:
    cfg = parse("--config", str(CONFIGS / "cpu-1p1d.toml"), "--model", "/m", "--dtype", "float32",
                "--prefill", "2", "--decode", "3", "--transfer", "whole", "--port", "9000",
                "--set", "engine.max_num_seqs=8", "--set", "server.host=0.0.0.0",
                "--set", 'server.cors_origins=["http://a"]', "--set", "timeouts.group_s=10.5",
                "--api-key", "k1", "--threads", "3")
    assert (cfg.model, cfg.dtype, cfg.transfer) == ("/m", "float32", "whole")
    assert (cfg.topology.prefill, cfg.topology.decode, cfg.topology.colocated) == (2, 3, 0)
    assert (cfg.server.port, cfg.server.host, cfg.server.cors_origins) == (9000, "0.0.0.0",
                                                                            ("http://a",))
    assert cfg.engine.max_num_seqs == 8 and cfg.timeouts.group_s == 10.5
    assert cfg.server.api_key == "k1"
    assert cfg.engine.threads == 3 and ServeConfig().engine.threads == 0


def test_the_mode_policy_times_come_from_the_modes_table() -> None:
    from pd_local.cluster.modes import CONFIRM_S, DWELL_S, RATE_TAU_S

    cfg = parse("--elastic", "2", "--set", "modes.dwell_s=0.5", "--set", "modes.confirm_s=0")
    assert (cfg.modes.dwell_s, cfg.modes.confirm_s, cfg.modes.rate_tau_s) == (0.5, 0.0, RATE_TAU_S)
    assert (ServeConfig().modes.dwell_s, ServeConfig().modes.confirm_s) == (DWELL_S, CONFIRM_S)


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_LOCAL_API_KEY", "from-env")
    assert parse().server.api_key == "from-env"
    assert parse("--api-key", "flag").server.api_key == "flag"


def test_colocated_flag_replaces_file_topology() -> None:
    cfg = parse("--config", str(CONFIGS / "cpu-1p2d.toml"), "--colocated", "3")
    assert (cfg.topology.prefill, cfg.topology.decode, cfg.topology.colocated) == (0, 0, 3)
    cfg = parse("--config", str(CONFIGS / "cpu-1p2d.toml"), "--elastic", "2")
    assert (cfg.topology.prefill, cfg.topology.decode, cfg.topology.elastic) == (0, 0, 2)
    assert cfg.topology.label == "elastic-2" and cfg.topology.world_size == 3


@pytest.mark.parametrize("argv, match", [
    (["--colocated", "2", "--prefill", "1"], "one of --prefill P --decode D, --colocated N or --elastic N"),
    (["--colocated", "2", "--elastic", "2"], "one of --prefill P --decode D, --colocated N or --elastic N"),
    (["--prefill", "1"], "--prefill and --decode go together"),
    (["--set", "engine.max_num_seqs"], "--set expects KEY=VALUE"),
    (["--set", "engine.max_num_seq=3"], "unknown key 'engine.max_num_seq'"),
    (["--set", "nosuch.key=3"], "unknown key 'nosuch.key'"),
])
def test_flag_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(*argv)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, match", [
    ("dtyp = 'bfloat16'", r"unknown key 'dtyp' \(known: model, dtype"),
    ("[engine]\nblok_size = 16", r"unknown key 'engine.blok_size' \(known: block_size"),
    ("[servr]\nport = 1", "unknown key 'servr'"),
    ("dtype = 'fp16'", "dtype must be one of auto, bfloat16, float32; got 'fp16'"),
    ("device = 'tpu'", "device must be one of cpu, cuda; got 'tpu'"),
    ("transfer = 'chunked'", "transfer must be one of layerwise, whole; got 'chunked'"),
    ("routing = 'random'", "routing must be one of load, round_robin, prefix; got 'random'"),
    ("[topology]\nprefill = 1\ndecode = 1\ncolocated = 2", "set one of .*colocated=2"),
    ("[topology]\nelastic = 2\ncolocated = 2", "set one of .*colocated=2, elastic=2"),
    ("[topology]\nelastic = -1", "topology.elastic must be >= 0, got -1"),
    ("[topology]\nprefill = 1", r"prefill >= 1 and decode >= 1.*decode=0"),
    ("[topology]\nprefill = -1\ndecode = 1", "topology.prefill must be >= 0, got -1"),
    ("[engine]\nblock_size = 12", "engine.block_size must be a power of two, got 12"),
    ("[engine]\nblock_size = '16'", "engine.block_size must be an integer, got '16'"),
    ("[engine]\nkv_cache_gb = -1.0", "engine.kv_cache_gb must be a finite number > 0, got -1.0"),
    ("[engine]\nkv_cache_gb = 1.0\ngpu_memory_fraction = 0.5", "exactly one of kv_cache_gb"),
    ("[engine]\ngpu_memory_fraction = 0.5", "gpu_memory_fraction applies to device = 'cuda'"),
    ("device = 'cuda'\n[engine]\ngpu_memory_fraction = 1.5",
     "engine.gpu_memory_fraction must be <= 1.0, got 1.5"),
    ("[engine]\nmax_num_seqs = 0", "engine.max_num_seqs must be >= 1, got 0"),
    ("[engine]\nthreads = -1", "engine.threads must be >= 0, got -1"),
    ("[engine]\nthreads = 2.5", "engine.threads must be an integer, got 2.5"),
    ("[engine]\nchunked_prefill = 1", "engine.chunked_prefill must be true or false, got 1"),
    ("[engine]\nenable_prefix_caching = \"on\"", "engine.enable_prefix_caching must be true or false, got 'on'"),
    ("[engine]\nprefill_policy = 'sjf'", "engine.prefill_policy must be one of"),
    ("[engine]\nnum_blocks = 64", r"unknown key 'engine.num_blocks' \(known: block_size"),
    ("[engine]\nbatch_invariant = 'no'", "engine.batch_invariant must be true or false, got 'no'"),
    ("[engine]\nnative_linear = 'yes'", 'engine.native_linear must be true, false or "auto", got \'yes\''),
    ("[server]\nport = 70000", "server.port must be <= 65535, got 70000"),
    ("[server]\nshutdown_grace_s = -1", "server.shutdown_grace_s must be a finite number >= 0, got -1"),
    ("[server]\nshutdown_grace_s = 'soon'", "server.shutdown_grace_s must be a number, got 'soon'"),
    ("[server]\nport = true", "server.port must be an integer, got True"),
    ("[server]\napi_key = ''", "server.api_key must be a non-empty string"),
    ("[server]\ncors_origins = 'http://a'", "server.cors_origins must be a list"),
    ("[timeouts]\ngroup_s = inf", "timeouts.group_s must be a finite number > 0, got inf"),
    ("[timeouts]\ngroup_s = 0", "timeouts.group_s must be a finite number > 0, got 0"),
    ("engine = 3", r"engine must be a table \(\[engine\]\), got 3"),
    ("share_device = true", "share_device = true applies to device = 'cuda' only"),
    ("[engine]\ncuda_graphs = 1", "engine.cuda_graphs must be true or false, got 1"),
    ("kv_ipc = 'yes'", "kv_ipc must be true or false, got 'yes'"),
    ("model = = 1", "not valid TOML"),
    ("[slo]\ntpot_budget = 1", "slo.tpot_budget must be true or false, got 1"),
    ("[modes]\nrate_tau_s = 0", "modes.rate_tau_s must be a finite number > 0, got 0"),
    ("[modes]\ndwell_s = -1", "modes.dwell_s must be a finite number >= 0, got -1"),
    ("[modes]\nconfirm = 1", r"unknown key 'modes.confirm' \(known: rate_tau_s, confirm_s, dwell_s\)"),
])
def test_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert str(path) in str(e.value)  # the message names the file


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file /no/such.toml not found"):
        load_config("/no/such.toml")


def test_cuda_defaults_to_memory_fraction(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "device = 'cuda'"))
    assert cfg.engine.gpu_memory_fraction == 0.85 and cfg.engine.kv_cache_gb is None


def test_world_rank_count() -> None:
    cfg = load_config(CONFIGS / "cpu-1p2d.toml")
    check_world(cfg, 4, 0)
    with pytest.raises(ConfigError, match=r"topology 1P2D needs 4 ranks \(1 front-end \+ 3 "
                                          r"workers: 1 prefill \+ 2 decode\), torchrun started 3"):
        check_world(cfg, 3, 0)
    with pytest.raises(ConfigError, match=r"colocated-2 needs 3 ranks .* started 5"):
        check_world(load_config(CONFIGS / "cpu-colocated-2.toml"), 5, 0)
    with pytest.raises(ConfigError, match=r"elastic-2 needs 3 ranks \(1 front-end \+ 2 workers: 2 elastic\)"):
        check_world(load_config(CONFIGS / "cpu-elastic-2.toml"), 4, 0)


def test_world_cuda_devices() -> None:
    cfg = load_config(CONFIGS / "gpu-2p2d.toml")
    check_world(cfg, 5, 4)
    with pytest.raises(ConfigError, match="2P2D has 4 worker ranks on a host but only 2 CUDA device"):
        check_world(cfg, 5, 2)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        check_world(cfg, 5, 0)
    shared = parse("--config", str(CONFIGS / "gpu-2p2d.toml"), "--set", "share_device=true")
    check_world(shared, 5, 1)


def test_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model directory /no/model not found"):
        check_model_dir(parse("--model", "/no/model"))
    model = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
             "max_position_embeddings": 1024}
    (tmp_path / "config.json").write_text(json.dumps(model))
    assert check_model_dir(parse("--model", str(tmp_path), "--set",
                                 "engine.max_model_len=1024")).num_layers == 2
    with pytest.raises(ConfigError, match="max_model_len = 2048 exceeds the model's "
                                          "max_position_embeddings = 1024"):
        check_model_dir(parse("--model", str(tmp_path)))
    (tmp_path / "config.json").write_text(
        json.dumps({**model, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.* is not supported"):
        check_model_dir(parse("--model", str(tmp_path)))


def test_one_engine_config_from_toml_and_from_code() -> None:
    """The [engine] table builds the very class the engine takes; code builds it the same way,
    with the same field-named errors, plus the code-only num_blocks and max_model_len=None."""
    assert type(load_config(CONFIGS / "cpu-1p1d.toml").engine) is EngineConfig
    assert EngineConfig(num_blocks=64).num_blocks == 64  # exact size: no memory budget needed
    assert EngineConfig(kv_cache_gb=0.1, max_model_len=None).max_model_len is None
    with pytest.raises(ConfigError, match="exactly one of kv_cache_gb and gpu_memory_fraction"):
        EngineConfig()
    with pytest.raises(ConfigError, match="engine.num_blocks must be >= 1, got 0"):
        EngineConfig(num_blocks=0)
    with pytest.raises(ConfigError, match="engine.max_model_len must be an integer, got 1.5"):
        EngineConfig(kv_cache_gb=1.0, max_model_len=1.5)  # type: ignore[arg-type]
