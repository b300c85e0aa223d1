"""Output directories: never delete or overwrite what edgesmith did not write.

A directory edgesmith creates gets a marker file; a later run may replace what is inside it. An
existing non-empty directory without the marker belongs to the user: it is refused unless the
user passes --force, and even then only the names edgesmith writes are replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgesmithError

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


def copy_dir_atomic(src: str | Path, dest: str | Path, force: bool = False) -> None:
    """Copy a directory to `dest` via a temp sibling and a rename: never half written. An
    existing `dest` is replaced only when edgesmith wrote it; with `force` files are written
    into a foreign one without removing anything else."""
    src, dest = Path(src), Path(dest)
    if dest.is_dir() and any(dest.iterdir()) and not is_ours(dest):
        if not force:
            claim(dest)      # raises: not ours
        for item in src.iterdir():
            if item.is_file():
                tmp = dest / f".{item.name}.tmp"
                shutil.copy2(item, tmp)
                os.replace(tmp, dest / item.name)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / MARKER).touch()
        os.chmod(tmp, 0o777 & ~_umask())    # mkdtemp makes 0700; the user's umask decides
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
