"""device_runtime stays small and standalone; targets ship with a plain install."""
from __future__ import annotations

import io
import subprocess
import sys
import tokenize

from conftest import ROOT

RUNTIME_BUDGET = 800   # lines of code: no blanks, comments or docstrings


def code_lines(path) -> int:
    """Lines holding code tokens, not counting comments, blank lines or docstrings."""
    lines: set[int] = set()
    prev = tokenize.INDENT
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE,
                                                    tokenize.DEDENT):
            prev = tok.type
            continue   # a docstring
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return len(lines)


def test_device_runtime_stays_under_budget():
    total = sum(code_lines(p) for p in (ROOT / "device_runtime").rglob("*.py"))
    assert 0 < total <= RUNTIME_BUDGET, f"device_runtime has {total} code lines"


def test_import_device_runtime_pulls_in_no_host_packages(models, tmp_path):
    """Loading and running a bundle imports neither sdk, onnx, click, rich nor torch."""
    from edgesmith.model import load
    from edgesmith.profiling import prepare

    bundle = prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")
    code = (
        "import sys, numpy as np, device_runtime\n"
        "light = {m.split('.')[0] for m in sys.modules}\n"
        f"s = device_runtime.load({str(bundle.path)!r})\n"
        "s.run({'input': np.zeros((1, 1, 8, 8), np.float32)})\n"
        "from device_runtime import facts; facts.collect()\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(light & {'numpy', 'onnxruntime'}), sorted(loaded))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    light, loaded = proc.stdout.split("] ", 1)
    assert light == "['numpy'"  # numpy came from the test's own import, not device_runtime
    for banned in ("sdk", "onnx", "click", "rich", "torch", "paramiko"):
        assert f"'{banned}'" not in loaded, f"device_runtime imported {banned}"


def test_bare_import_is_light():
    code = "import sys, device_runtime; print(sorted(m for m in sys.modules if m in " \
           "('numpy', 'onnxruntime', 'onnx', 'sdk')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_targets_ship_with_a_plain_install(tmp_path):
    """`pip install .` (not -e) must find the profiles: build the wheel and look inside."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("edgesmith-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgesmith_targets/x86-avx2.toml" in names
    assert "device_runtime/backends/onnxruntime.py" in names and "sdk/cli.py" in names
