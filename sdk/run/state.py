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

from ..errors import EdgesmithError
from ..measure import Candidate
from ..model import Model, atomic_write


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


def changed_parts(old, new: dict) -> list[str]:
    """What differs between two run keys, by name: `model`, `eval`, `device`, and a changed
    setting as `config.max_accuracy_drop`; `unreadable` when the old key could not be read."""
    if not isinstance(old, dict):
        return ["unreadable"]
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            parts.append(key)
    return parts


STATE_DIR = ".edgesmith-state"
OWN_FILES = ("run.json", "candidates.jsonl", "int8.json", "finished.json")
FORMATS = (".onnx", ".tflite")


class State:
    """OUT/.edgesmith-state: measured candidates (JSON lines) and their models, under a run
    key. Only files edgesmith writes there are ever deleted."""

    def __init__(self, out_dir: Path, run_key: dict):
        self.dir = out_dir / STATE_DIR
        self.path = self.dir / "candidates.jsonl"
        self.done: dict[str, Candidate] = {}
        self.discarded = False
        self.changed: list[str] = []     # what differs from the run whose state was discarded
        if self.dir.exists() and not self.dir.is_dir():
            raise EdgesmithError(f"{self.dir} is a file, not edgesmith's state directory; move "
                                 "it away or choose another -o")
        key_path = self.dir / "run.json"
        run_key = json.loads(json.dumps(run_key, sort_keys=True))     # tuples as JSON has them
        if self.dir.is_dir():
            try:
                old = json.loads(key_path.read_text())
            except (OSError, ValueError):
                old = None
            if old != run_key:  # another model, data, device, budget or version: start afresh
                self.changed = changed_parts(old, run_key)
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
        for model in (self.dir / "models").glob("*.*"):
            if len(model.stem) == 64 and model.suffix in FORMATS:   # ours: named by sha256
                model.unlink()

    def finish(self) -> None:
        """The job finished: its report's hash, so a re-run answers with it (`finished`)."""
        report = self.dir.parent / "report.json"
        atomic_write(self.dir / "finished.json",
                     json.dumps({"report_sha256": sha256(report.read_bytes())}).encode())

    def finished(self) -> bytes | None:
        """The finished job's report.json as written, or None (not finished, or changed)."""
        try:
            mark = json.loads((self.dir / "finished.json").read_text())
            raw = (self.dir.parent / "report.json").read_bytes()
        except (OSError, ValueError):
            return None
        return raw if isinstance(mark, dict) and mark.get("report_sha256") == sha256(raw) \
            else None

    def model_path(self, sha: str) -> Path:
        """The stored model of that hash, whichever its format (an .onnx path if none)."""
        paths = [self.dir / "models" / f"{sha}{suffix}" for suffix in FORMATS]
        return next((p for p in paths if p.is_file()), paths[0])

    def save(self, cand: Candidate, model: Model | None) -> None:
        path = self.dir / "models" / f"{cand.model_sha256}.{model.format}" if model else None
        if path is not None and not path.is_file():
            atomic_write(path, model.serialized())
        torn = self.path.is_file() and self.path.stat().st_size and \
            self.path.read_bytes()[-1:] != b"\n"
        with open(self.path, "a") as fh:
            fh.write(("\n" if torn else "") + json.dumps(asdict(cand)) + "\n")
        self.done[cand.id] = cand

    def load_model(self, cand: Candidate, like: Model) -> Model:
        """The candidate's model, with `like`'s input names and dtypes."""
        import onnx

        from ..model import from_proto
        from ..convert.tflite import as_model

        path = self.model_path(cand.model_sha256)
        if path.suffix == ".tflite":
            return as_model(path.read_bytes(), like)
        return from_proto(onnx.load(str(path)), like)
