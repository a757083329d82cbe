"""Load a safetensors checkpoint (sharded or not; no pickle) into `LlamaForCausalLM` by the
model's own parameter names: each must be present with its exact shape; a tied lm_head and
rotary inv_freq are ignored, any other extra tensor is an error. Buffers keep fp32."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from pd_local.model.config import ModelConfig
from pd_local.model.gguf_reader import WeightsError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it; WeightsError when there is no safetensors
    checkpoint (naming what there is), a malformed index or a missing shard."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".gguf":
        raise WeightsError(
            f"{model_dir} is a GGUF file; convert it first: pd-local weights convert-gguf "
            f"{model_dir} OUT_DIR"
        )
    if not model_dir.is_dir():
        raise WeightsError(f"model directory not found: {model_dir}")
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index} names shard {f.name}, which is missing from {model_dir}")
    else:
        pickles = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
        if pickles:
            raise WeightsError(
                f"{model_dir} has only pickle checkpoints ({', '.join(pickles)}); pd_local loads "
                f"safetensors only (pickle files can run code). Re-save the model with "
                f"save_pretrained(..., safe_serialization=True)"
            )
        ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
        hint = f"; convert the GGUF with pd-local weights convert-gguf {ggufs[0]} OUT_DIR" if ggufs else ""
        raise WeightsError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                names = list(st.keys())
        except Exception as e:  # safetensors' own error type for a corrupt/truncated header
            raise WeightsError(f"{f} cannot be read as safetensors: {e}") from e
        for name in names:
            if name in where:
                raise WeightsError(f"tensor {name!r} is in both {where[name].name} and {f.name}")
            where[name] = f
    return where


def load_weights(
    model: nn.Module,
    model_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> None:
    """Fill every parameter of `model` in place from `model_dir`, as `dtype` on `device` (None:
    where it is), so tying survives; WeightsError naming a missing, misshapen or unexpected
    tensor."""
    from safetensors import safe_open

    t0 = time.monotonic()
    params = dict(model.named_parameters())  # tied parameters appear once
    where = checkpoint_files(model_dir)
    tied = "lm_head.weight" not in params and "model.embed_tokens.weight" in params
    unexpected = sorted(
        name for name in where
        if name not in params
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (tied and name == "lm_head.weight")
    )
    if unexpected:
        raise WeightsError(
            f"{model_dir}: {len(unexpected)} tensor(s) the model has no parameter for, e.g. "
            f"{unexpected[:5]} (does config.json describe this checkpoint?)"
        )
    missing = sorted(set(params) - set(where))
    if missing:
        raise WeightsError(
            f"{model_dir}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:5]}"
        )
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as st:
            for name in names:
                param = params[name]
                shape = tuple(st.get_slice(name).get_shape())
                if shape != tuple(param.shape):
                    raise WeightsError(
                        f"{path}: tensor {name!r} has shape {shape}, the model expects "
                        f"{tuple(param.shape)}"
                    )
                tensor = st.get_tensor(name)
                if not tensor.is_floating_point():
                    raise WeightsError(f"{path}: tensor {name!r} has non-float dtype {tensor.dtype}")
                param.data = tensor.to(device=device or param.device, dtype=dtype)
    logger.info("loaded %d tensors from %s in %.1f s", len(params), model_dir, time.monotonic() - t0)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    fuse: bool = True,
) -> tuple[nn.Module, ModelConfig]:
    """Build `LlamaForCausalLM` from `model_dir/config.json` and load its weights, in eval mode.

    Parameters end up as `dtype` on `device`; buffers keep their dtype. Raises ModelConfigError
    for an unsupported config and WeightsError for checkpoint problems (see `load_weights`).
    """
    from pd_local.model.llama import LlamaForCausalLM

    cfg = ModelConfig.from_dir(model_dir)
    checkpoint_files(model_dir)  # fail on a missing/pickle checkpoint before building the model
    # Built on the CPU: Linear parameters are torch.empty, so nothing is initialised or copied
    # before load_weights replaces each one with the checkpoint's tensor on `device`.
    model = LlamaForCausalLM(cfg)
    load_weights(model, model_dir, dtype, device)
    model.to(device=device)  # now moves only the buffers; no dtype, so rope inv_freq stays fp32
    if fuse:  # after loading: the checkpoint's names are the unfused ones
        model.fuse_projections()
    return model.eval(), cfg
