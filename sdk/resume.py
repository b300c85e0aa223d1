"""OUT/.edgesmith-state: what an interrupted `optimize` already measured, kept under a run key.

The key holds everything that decides a result (model bytes, input specs, data hashes, device
fingerprint, settings, edgesmith version): a re-run of the same job resumes; a different job
finds a different key and starts afresh (the old state is ours to delete).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import onnx

from .errors import EdgesmithError
from .measure import Candidate
from .model import atomic_write


def sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def source_digest(path) -> str | None:
    """What a data source holds: a file's sha256; for an image folder, every file's name and
    content (edited pixels are other data, whatever the file sizes)."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(p) if p.is_dir() else "").encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


STATE_DIR = ".edgesmith-state"
OWN_FILES = ("run.json", "candidates.jsonl", "int8.json")


class State:
    """OUT/.edgesmith-state: measured candidates (JSON lines) and their models, under a run
    key. Only files edgesmith writes there are ever deleted."""

    def __init__(self, out_dir: Path, run_key: dict):
        self.dir = out_dir / STATE_DIR
        self.path = self.dir / "candidates.jsonl"
        self.done: dict[str, Candidate] = {}
        self.discarded = False
        if self.dir.exists() and not self.dir.is_dir():
            raise EdgesmithError(f"{self.dir} is a file, not edgesmith's state directory; move "
                                 "it away or choose another -o")
        key_path = self.dir / "run.json"
        run_key = json.loads(json.dumps(run_key, sort_keys=True))     # tuples as JSON has them
        if self.dir.is_dir():
            try:
                same = json.loads(key_path.read_text()) == run_key
            except (OSError, ValueError):
                same = False
            if not same:        # another model, data, device, budget or version: start afresh
                self._reset()
                self.discarded = True
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        atomic_write(key_path, json.dumps(run_key, sort_keys=True).encode())
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    c = Candidate(**json.loads(line))
                    assert isinstance(c.id, str) and isinstance(c.model_sha256, str)
                except (ValueError, TypeError, AssertionError):
                    continue   # a torn or foreign line: measured again, never trusted
                if not c.model_sha256 or self.model_path(c.model_sha256).is_file() or c.error:
                    self.done[c.id] = c

    def _reset(self) -> None:
        for name in OWN_FILES:
            (self.dir / name).unlink(missing_ok=True)
        for model in (self.dir / "models").glob("*.onnx"):
            if len(model.stem) == 64:           # ours are named by their sha256
                model.unlink()

    def model_path(self, sha: str) -> Path:
        return self.dir / "models" / f"{sha}.onnx"

    def save(self, cand: Candidate, proto: onnx.ModelProto | None) -> None:
        if proto is not None and not self.model_path(cand.model_sha256).is_file():
            atomic_write(self.model_path(cand.model_sha256), proto.SerializeToString())
        torn = self.path.is_file() and self.path.stat().st_size and \
            self.path.read_bytes()[-1:] != b"\n"
        with open(self.path, "a") as fh:
            fh.write(("\n" if torn else "") + json.dumps(asdict(cand)) + "\n")
        self.done[cand.id] = cand

    def load_model(self, cand: Candidate) -> onnx.ModelProto:
        return onnx.load(str(self.model_path(cand.model_sha256)))
