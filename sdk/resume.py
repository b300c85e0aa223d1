"""OUTDIR/.state: what an interrupted `optimize` already measured, kept under a run key.

The key holds everything that decides a result (model bytes, input specs, data hashes, device
fingerprint, settings, edgesmith version): a re-run of the same job resumes; a different job
finds a different key and starts afresh (the old state is ours to delete).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import onnx

from .measure import Candidate
from .model import atomic_write


def sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def source_digest(path) -> str | None:
    """What a data source holds: a file's sha256; for an image folder, its names and sizes."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        listing = sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*")
                         if f.is_file())
        return sha256(json.dumps(listing).encode())
    return sha256(p.read_bytes())


class State:
    """OUTDIR/.state: measured candidates (JSON lines) and their models, under a run key."""

    def __init__(self, out_dir: Path, run_key: dict):
        self.dir = out_dir / ".state"
        self.path = self.dir / "candidates.jsonl"
        self.done: dict[str, Candidate] = {}
        self.discarded = False
        key_path = self.dir / "run.json"
        run_key = json.loads(json.dumps(run_key, sort_keys=True))     # tuples as JSON has them
        if self.dir.is_dir():
            try:
                same = json.loads(key_path.read_text()) == run_key
            except (OSError, ValueError):
                same = False
            if not same:        # another model, data, device, budget or version: start afresh
                shutil.rmtree(self.dir)
                self.discarded = True
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        atomic_write(key_path, json.dumps(run_key, sort_keys=True).encode())
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    c = Candidate(**json.loads(line))
                except (ValueError, TypeError):
                    continue   # a torn line from an interrupted run
                if not c.model_sha256 or self.model_path(c.model_sha256).is_file() or c.error:
                    self.done[c.id] = c

    def model_path(self, sha: str) -> Path:
        return self.dir / "models" / f"{sha}.onnx"

    def save(self, cand: Candidate, proto: onnx.ModelProto | None) -> None:
        if proto is not None and not self.model_path(cand.model_sha256).is_file():
            atomic_write(self.model_path(cand.model_sha256), proto.SerializeToString())
        with open(self.path, "a") as fh:
            fh.write(json.dumps(asdict(cand)) + "\n")
        self.done[cand.id] = cand

    def load_model(self, cand: Candidate) -> onnx.ModelProto:
        return onnx.load(str(self.model_path(cand.model_sha256)))
