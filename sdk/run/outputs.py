"""Output directories: never delete or overwrite what edgesmith did not write.

A directory edgesmith creates gets a marker file; a later run may replace what is inside it. An
existing non-empty directory without the marker belongs to the user: it is refused unless the
user passes --force, and even then only the names edgesmith writes are replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import EdgesmithError

MARKER = ".edgesmith-output"


def is_ours(path: Path) -> bool:
    return (path / MARKER).is_file()


def claim(path: str | os.PathLike, force: bool = False, what: str = "output directory") -> Path:
    """Create `path` (or accept an empty or edgesmith-written one) and mark it as ours."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgesmithError(f"{what} {path} is a file; choose a directory path for -o")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise EdgesmithError(f"cannot create {what} {path}: {parent} is a file")
    foreign = path.is_dir() and any(path.iterdir()) and not is_ours(path)
    if foreign and not force:
        raise EdgesmithError(f"{what} {path} already holds files edgesmith did not write; "
                             "choose another -o, or pass --force to write into it (only "
                             "edgesmith's own file names are replaced)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not foreign:          # a forced foreign directory stays the user's: never replaced
            (path / MARKER).touch()
    except OSError as exc:
        raise EdgesmithError(f"cannot create {what} {path}: {exc.strerror}") from None
    return path


def move_aside(out: Path) -> Path | None:
    """A different job's result in OUT (model, bundle, reports) into OUT/previous-<time>/, by
    rename: a finished result is never replaced without the user asking. None: nothing there."""
    from .state import STATE_DIR

    items = [p for p in out.iterdir() if p.name not in (MARKER, STATE_DIR)
             and not p.name.startswith(("previous-", "."))]
    if not items or not is_ours(out):      # a --force'd folder of the user's is left as it is
        return None
    aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    aside.mkdir()
    for item in items:
        os.replace(item, aside / item.name)
    return aside


def copy_dir_atomic(src: str | Path, dest: str | Path, force: bool = False) -> None:
    """Put a bundle's files into `dest` without ever removing or renaming a directory: a new
    `dest` is built aside and renamed into place; an existing one (ours, or any with `force`)
    gets each file replaced atomically by name, the manifest last, so a reader sees the old
    bundle or the new one. Nothing else in `dest` is touched; modes follow the user's umask."""
    src, dest = Path(src), Path(dest)
    if dest.exists() and not dest.is_dir():
        raise EdgesmithError(f"{dest} is a file; edgesmith writes a bundle directory there")
    if dest.is_dir() and any(dest.iterdir()) and not is_ours(dest) and not force:
        raise EdgesmithError(f"{dest} already holds files edgesmith did not write; choose "
                             "another -o, or pass --force to write into it")
    files = sorted((p for p in src.iterdir() if p.is_file()), key=lambda p: p.name == MANIFEST_NAME)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            for item in files:
                _copy_file(item, tmp / item.name)
            (tmp / MARKER).touch()
            os.chmod(tmp, 0o777 & ~_umask())    # mkdtemp makes 0700
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    for item in files:
        _copy_file(item, dest / item.name)


MANIFEST_NAME = "manifest.json"


def write_model(out: Path, stored: Path) -> None:
    """OUT/model.onnx or OUT/model.tflite: the best so far. In a directory edgesmith created,
    the other format's file (an earlier best) goes: two answers would be one too many; in a
    user's directory (--force) nothing of theirs is removed."""
    from ..model import atomic_write

    atomic_write(out / f"model{stored.suffix}", stored.read_bytes())
    if is_ours(out):
        for other in {".onnx", ".tflite"} - {stored.suffix}:
            (out / f"model{other}").unlink(missing_ok=True)


def _copy_file(src: Path, dest: Path) -> None:
    from ..model import atomic_write
    atomic_write(dest, src.read_bytes())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
