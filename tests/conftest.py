"""Shared fixtures: the committed example models, an isolated cache, the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own bundle cache: no test sees another's bundles."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGESMITH_CACHE", str(cache))
    return cache


@pytest.fixture
def models() -> Path:
    return MODELS


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `edgesmith ARGS` as a user would: a separate process, real exit code and streams."""
    return subprocess.run([sys.executable, "-m", "sdk.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
