"""A MiniLM-class sentence encoder (tests/text_encoder.py) through profile, quantize and
optimize: three int64 token inputs with a dynamic sequence length, an attention mask filled
with float32's lowest value, an embedding judged by SQNR against the model's own fp32."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import load_json, require, run_cli
from text_encoder import linear_macs, tokens

WIDTH, LAYERS, SEQ = 128, 2, 16


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    require(importlib.util.find_spec("torch") is not None,
            "needs torch: pip install torch==2.13.0 'edgesmith[train]'")
    from text_encoder import export

    folder = tmp_path_factory.mktemp("encoder")
    export(folder / "encoder.onnx", WIDTH, 4, LAYERS, SEQ)
    np.savez(folder / "calib.npz", **tokens(64, SEQ, 1))
    np.savez(folder / "heldout.npz", **tokens(64, SEQ, 2))
    return folder


def test_an_encoders_matmuls_count_and_it_is_timed_on_its_own_tokens(encoder):
    from edgesmith import bundle as bundles
    from edgesmith.devices import Job, get_device
    from edgesmith.measure import measure
    from edgesmith.model import load
    from edgesmith.search.int8 import recipe_by_name, why_not

    model = load(encoder / "encoder.onnx", data=encoder / "calib.npz")
    # before: the heads' computed reshapes hid 7/8 of the MatMuls and dynamic int8 was
    # "not tried: 0 % of this model's MACs"
    assert model.facts.macs_by_op.get("MatMul", 0) >= linear_macs(WIDTH, LAYERS, SEQ)
    facts = get_device("local").facts()
    assert why_not(recipe_by_name("dynamic-int8"), facts, model) is None
    # before: timing fed random ids 0..9, and a segment id of 7 in a 2-row table failed
    # every timing-only run (the interleaved confirmation among them)
    result = measure(get_device("local"), bundles.build(model),
                     Job(runs=5, warmup=1, min_time_s=0.0, evaluate=False))
    assert result.ok and result.latency_ms["p50"] > 0, result.error


def test_profile_quantize_and_optimize_an_encoder(encoder, tmp_path):
    model, calib, held = (encoder / n for n in ("encoder.onnx", "calib.npz", "heldout.npz"))
    r = run_cli("profile", model, "--eval", held, "--runs", 20)
    assert r.returncode == 0 and "SQNR" in r.stdout, r.stderr
    r = run_cli("quantize", model, "--calib", calib, "--eval", held, "-o", tmp_path / "q.onnx",
                "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stdout + r.stderr       # onnxruntime's quantizer, kept quiet
    report = load_json(tmp_path / "q.json")
    assert any(n.startswith("onnxruntime's quantizer warned") for n in report["notes"])
    dynamic = next(c for c in report["candidates"] if c["id"] == "dynamic-int8")
    assert dynamic["error"] is None and dynamic["accuracy"]["sqnr_db"] >= 25, dynamic
    out = tmp_path / "out"
    r = run_cli("optimize", model, "--calib", calib, "--eval", held, "-o", out,
                "--tune-budget", "0", "--backends", "onnxruntime", timeout=600)
    assert r.returncode == 0, r.stderr
    report = load_json(out / "report.json")
    chosen = next(c for c in report["candidates"] if c["id"] == report["chosen"])
    assert chosen["error"] is None and chosen["accuracy"]["sqnr_db"] >= 25, chosen
    measured = {c["id"] for c in report["candidates"] if c["error"] is None}
    assert "int8:dynamic-int8" in measured, measured


def test_fuse_and_tune_an_encoder(encoder, tmp_path):
    """The rest of the corpus matrix's commands on the encoder: fuse keeps its embeddings,
    tune times and judges it on its own tokens (--eval: random ids fall outside its tables)."""
    import onnxruntime as ort

    model, held = encoder / "encoder.onnx", encoder / "heldout.npz"
    r = run_cli("fuse", model, "-o", tmp_path / "fused.onnx")
    assert r.returncode == 0, r.stderr
    feed = {k: v[:4] for k, v in np.load(held).items()}
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                 for p in (model, tmp_path / "fused.onnx"))
    assert np.allclose(got, want, atol=1e-4)
    r = run_cli("tune", model, "--eval", held, "--max-trials", 3, "--budget", "30s",
                "--json", tmp_path / "tune.json")
    assert r.returncode == 0, r.stderr
    tuned = load_json(tmp_path / "tune.json")
    assert all(t["error"] is None for t in tuned["trials"]), tuned["trials"]
    assert tuned["default"]["accuracy"]["sqnr_db"] >= 100      # the defaults judge themselves


def test_calibration_in_smaller_runs_gives_the_same_ranges(encoder, monkeypatch):
    """Calibration runs are split to bound host memory (a MiniLM-size encoder: 2.9 GB -> 1.0
    GB); min/max ranges over any split are the same, so the int8 model is too."""
    import onnx
    from onnx import numpy_helper

    from edgesmith.model import load
    from edgesmith.passes import quantize as q
    from edgesmith.search.int8 import quant_data, recipe_by_name

    model = load(encoder / "encoder.onnx", data=encoder / "calib.npz")
    batches = quant_data(model, encoder / "calib.npz", encoder / "heldout.npz").batches
    assert len(q.calibration_feeds(model.proto, batches)) == len(batches)   # small: as given

    def scales(run_bytes: int) -> dict:
        monkeypatch.setattr(q, "CALIBRATION_RUN_BYTES", run_bytes)
        proto, _ = q.quantize_static(model.proto, q.QuantizeConfig(recipe_by_name("qdq-u8s8"),
                                                                   batches))
        return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and t.name.endswith("_scale")}
    whole, split = scales(1 << 40), scales(1)          # one sample per run
    assert len(q.calibration_feeds(model.proto, batches)) == 64
    assert whole.keys() == split.keys() and len(whole) > 10
    assert all(np.allclose(whole[k], split[k], rtol=1e-6) for k in whole)


def test_data_named_unlike_the_inputs_is_the_error_not_a_missing_shape(encoder, tmp_path):
    """Before: the sequence length, unknown, was the complaint ("pass --eval/--calib data")
    although the data was passed; the misnamed array is the cause."""
    data = tokens(8, SEQ, 4)
    np.savez(tmp_path / "ids.npz", ids=data["input_ids"], attention_mask=data["attention_mask"],
             token_type_ids=data["token_type_ids"])
    r = run_cli("profile", encoder / "encoder.onnx", "--eval", tmp_path / "ids.npz")
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "has no array named 'input_ids'" in r.stderr and "['attention_mask', 'ids'," \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
