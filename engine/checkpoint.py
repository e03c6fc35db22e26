"""Checkpoints: versioned plain dicts, written atomically, loadable with weights_only=True.

Layout of a project checkpoint (FORMAT_VERSION 1):
    {"format": "mbv3-recipes", "version": 1, "model": <state dict in torchvision's key layout>,
     "config": <resolved recipe as a plain dict>, "epoch": int, ... script-specific entries}
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError

FORMAT = "mbv3-recipes"
FORMAT_VERSION = 1


class NoSpace(UserError):
    """The disk (or quota) filled up while a file was written; the temporary file is removed."""

    def __init__(self, path: Path):
        super().__init__(f"no space left on device while writing {path}")
        self.path = path


def _atomic_replace(path: Path, write) -> None:
    """Write through a temp file + fsync + rename. The file gets the mode a plain open() would give
    (0666 & ~umask; mkstemp's is 0600, which would hide a run from the rest of a team)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _no_space(exc):  # torch.save reports it as a RuntimeError with the OSError chained
            raise NoSpace(path) from None
        raise


def _no_space(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def file_mode() -> int:
    """The mode a plain open() gives a new file (0666 & ~umask), for files made through mkstemp (0600)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads' file creation)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_replace(Path(path), lambda fh: fh.write(text.encode()))


def save(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save through a temp file + fsync + rename: a reader never sees half a file."""
    _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def new(model_state: dict[str, torch.Tensor], **entries: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": model_state, **entries}


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a project checkpoint or a plain state dict (returned as {"model": state_dict}).

    mmap: map the file instead of reading it, so only the tensors used are ever read (files in
    torch's legacy non-zip format cannot be mapped and are read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (state dict or project checkpoint), got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format version {obj.get('version')} is not supported "
                             f"(this code reads version {FORMAT_VERSION})")
        return obj
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    if "model" in obj and isinstance(obj["model"], dict):  # torchvision reference-script checkpoints
        return {"model": obj["model"]}
    raise ValueError(f"{path}: neither a state dict nor a project checkpoint (keys: {sorted(obj)[:8]})")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (exported weights, shards, their manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes (independent of file encoding)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prune(directory: Path, keep: int | None, pattern: str = "epoch_*.pt") -> None:
    """Keep the newest `keep` files matching pattern (None keeps all)."""
    if keep is None:
        return
    files = sorted(Path(directory).glob(pattern))
    for f in files[: max(0, len(files) - keep)]:
        f.unlink(missing_ok=True)


def link_or_save(src: Path, dst: Path, obj: dict[str, Any]) -> None:
    """Make `dst` the same checkpoint as `src` atomically: a hard link (no second write) where the
    filesystem allows, else a second atomic save."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        save(obj, dst)
