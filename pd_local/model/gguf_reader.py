"""Opening a GGUF file and reading its metadata, and `WeightsError`, which every weights
problem a user can cause raises (naming the file and what is wrong with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GGUF_MAGIC = b"GGUF"

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class WeightsError(ValueError):
    """Weights we cannot read or write; the message names the file and what is wrong with it."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' | 'float32' | torch.bfloat16 | torch.float32 -> torch.dtype, else WeightsError."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise WeightsError(f"unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in _DTYPES.items() if d == dtype)


def open_gguf(path: str | Path) -> Any:
    """A memory-mapped gguf.GGUFReader of `path`; WeightsError for a missing file, no GGUF magic,
    an unparsable header, or tensor data past the end (a truncated download)."""
    from gguf import GGUFReader  # imported here: `gguf` pulls in numpy machinery we rarely need

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"not a file: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise WeightsError(
            f"{path} is not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})"
        )
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises IndexError/ValueError/struct errors on short files
        raise WeightsError(
            f"{path} is truncated or corrupt ({size} bytes): the GGUF reader failed with "
            f"{type(e).__name__}: {e}"
        ) from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise WeightsError(
                f"{path} is truncated: tensor {t.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )
    return reader


def get_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata field `key`, or `default` when the GGUF has none."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def require_field(reader: Any, key: str, path: Path) -> Any:
    value = get_field(reader, key)
    if value is None:
        raise WeightsError(f"{path}: GGUF metadata has no {key!r}")
    return value
