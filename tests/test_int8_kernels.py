"""edgesmith's int8 inverted-residual kernel: on the QDQ model's own grid, equal to onnxruntime's
int8 run bit for bit, taken only where a block's quantizers allow it (and why not elsewhere),
and kept by tuning only where the whole model measures faster."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import require_kernel_build
from qdq_blocks import avx_vnni_stand_in, qdq_block, reference_saturates
from test_kernels import HOST, MIXED, STEMS, WIDE, block_model
from edgesmith.data import calibration_batches
from edgesmith.devices import get_device
from edgesmith.model import load, static_shapes
from edgesmith.own_kernels import LIBRARY, build, int8_agreement, rewrite_for_device
from edgesmith.passes.int8_kernels import fuse_int8_inverted_residual
from edgesmith.passes.kernels import KernelConfig
from edgesmith.passes.quantize import QuantizeConfig, QuantRecipe, quantize_static

VNNI = ["avx512f", "avx2", "fma", "avx512bw", "avx512vl", "avx512_vnni"]
# without VNNI, onnxruntime's own u8s8 kernels saturate int16 pair sums: exact comparisons
# there use 7-bit weights (the recipes' reduce_range), which cannot saturate
SATURATES = HOST["arch"] == "x86_64" and reference_saturates(HOST["cpu_flags"])
BUILDS = {"avx512-vnni": VNNI, "avx-vnni": ["avx2", "fma", "avx_vnni"], "avx2": ["avx2", "fma"],
          "sse": []}


def build_for(isa: str, monkeypatch) -> Path:
    """The library of one x86 build, run on this host. A host with AVX-512 VNNI but no AVX-VNNI
    (Zen 4, Ice Lake, Sapphire Rapids lack the VEX form) runs the AVX-VNNI build's code with its
    256-bit `vpdpbusd` in the EVEX encoding (scripts/evex-cc): the same instruction and the same
    C, so only the encoding, the compiler's job, goes untested there."""
    flags = set(HOST["cpu_flags"])
    env = avx_vnni_stand_in(flags, os.environ.get("CC", "cc")) if isa == "avx-vnni" \
        else {} if set(BUILDS[isa]) <= flags else None
    if HOST["arch"] != "x86_64" or env is None:
        pytest.skip(f"this CPU cannot run {isa} code")      # CI's CPU may lack AVX-512 VNNI
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    library, tc = build({"arch": "x86_64", "cpu_flags": BUILDS[isa]})
    assert tc.isa == isa.replace("avx512-vnni", "avx512")
    return library


@pytest.fixture(autouse=True)
def kernel_build():
    require_kernel_build()


def spec(shape):
    return type("Spec", (), {"shape": shape, "dtype": "float32"})


def qdq(model: onnx.ModelProto, shape, recipe=QuantRecipe("qdq-u8s8", reduce_range=SATURATES),
        seed=1):
    """The model through onnxruntime's static quantizer as the recipe search runs it: uint8
    activations, int8 per-channel weights, Relu/Clip folded into the quantizers."""
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    return quantize_static(model, QuantizeConfig(recipe, feeds))[0]


@pytest.mark.parametrize("isa", list(BUILDS))
def test_every_int8_block_equals_onnxruntime_bit_for_bit(isa, monkeypatch):
    """Stems of stride 2 and 1 (one after a block: NHWC back to NCHW), residuals, stride 2,
    channel counts off the vector width, several weight panels, odd and one-row images,
    batches, band heights and the threads' row ranges, on each x86 build's own code path."""
    library = build_for(isa, monkeypatch)
    # AVX2 has a tile for 7-bit weights (reduce_range: vpmaddubsw cannot saturate) and one for
    # 8-bit weights; a host whose onnxruntime saturates compares 7-bit weights only
    cases = [(blocks, hw, batch, seven) for seven in sorted({SATURATES, isa == "avx2"})
             for blocks, hw, batch in [(STEMS + MIXED, (13, 13), 2), (MIXED, (1, 5), 3),
                                       (WIDE, (29, 31), 1), (STEMS + MIXED, (97, 61), 1),
                                       (MIXED, (14, 7), 1)]]
    for blocks, (h, w), batch, seven in cases:
        shape = [batch, blocks[0][0], h, w]
        model = qdq(block_model(blocks, h, w, batch, "Clip"), shape,
                    QuantRecipe("qdq-u8s8", reduce_range=seven))
        for rows in (0, 1, 3):
            fused, report = fuse_int8_inverted_residual(model, KernelConfig(tile_rows=rows))
            assert report.changed == len(blocks), report.details
            assert {n.op_type for n in fused.graph.node} & {"Conv", "QLinearConv"} == set()
            equal, steps = int8_agreement(model, fused, {"x": spec(shape)}, library,
                                          report.metrics["blocks"])
            assert equal == 1.0 and steps == 0, (isa, seven, h, w, rows, equal, steps)
    # and what the check measures: one step off in one bias is seen
    fused, _ = fuse_int8_inverted_residual(model)
    bias = next(t for t in fused.graph.initializer if t.name.endswith("_qproject_b"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3000, bias.name))
    assert int8_agreement(model, fused, {"x": spec(shape)}, library,
                          fuse_int8_inverted_residual(model)[1].metrics["blocks"])[0] < 0.999


def as_model(proto: onnx.ModelProto, path):
    """A quantized proto as a user's model file."""
    onnx.save(proto, path)
    return load(path)


def test_only_blocks_on_the_kernels_grid_are_taken_and_the_rest_say_why(tmp_path):
    shape = [1, 8, 9, 9]
    model = qdq(block_model(MIXED, 9, 9), shape)
    weights = [t for t in model.graph.initializer if t.name.endswith("_quantized")
               and numpy_helper.to_array(t).dtype == np.int8]
    zero = next(t for t in model.graph.initializer
                if t.name == weights[0].name.replace("_quantized", "_zero_point"))
    zero.CopyFrom(numpy_helper.from_array(np.ones_like(numpy_helper.to_array(zero)), zero.name))
    fused, report = fuse_int8_inverted_residual(model)
    assert report.changed == len(MIXED) - 1
    assert any("the expand conv's weights have a zero point" in line for line in report.details)
    assert int8_agreement(model, fused, {"x": spec(shape)}, build(HOST)[0],
                          report.metrics["blocks"]) == (1.0, 0.0)
    # a float model has no int8 block; a u8 weight grid is not the kernel's
    u8 = qdq(block_model(MIXED, 9, 9), shape, QuantRecipe("qdq-u8u8", weights="U8"))
    reason = rewrite_for_device(as_model(u8, tmp_path / "u8.onnx"), 0, 0, HOST)
    assert isinstance(reason, str) and reason.startswith("no int8 inverted-residual block")
    assert "weights are not constant int8" in reason
    assert fuse_int8_inverted_residual(block_model(MIXED, 9, 9))[1].changed == 0
    # the knob's smallest side leaves small blocks on onnxruntime, saying so
    model = as_model(qdq(block_model(STEMS + MIXED, 16, 16), [1, 3, 16, 16]), tmp_path / "s.onnx")
    shapes = static_shapes(model.proto, model.inputs)
    _, small = fuse_int8_inverted_residual(model.proto, KernelConfig(min_side=16, shapes=shapes))
    assert small.changed == 0
    assert sum("smaller than 16 pixels a side" in line for line in small.details) == 6

def test_tuning_an_int8_model_tries_the_int8_kernels_and_keeps_them_only_when_faster(
        models, tmp_path):
    from edgesmith.search.tune import tune
    from edgesmith.variants import space

    original = load(models / "digits_mnv2.onnx")
    batches = list(calibration_batches(models / "digits_mnv2_eval.npz", original, 16))[:4]
    int8 = as_model(quantize_static(original.proto, QuantizeConfig(
        QuantRecipe("qdq-u8s8", reduce_range=SATURATES), batches))[0], tmp_path / "int8.onnx")
    dev = get_device("local")
    sp = space({"threads": [1], "edgesmith_kernels": [0, 8]}, dev.facts(), "onnxruntime")
    report = tune(int8, dev, search_space=sp, confirm_rounds=3,
                  measure_settings={"runs": 20, "warmup": 3, "min_time_s": 0})
    ours = [t for t in report.trials if "edgesmith_kernels=8" in t.id]
    assert ours and all(t.ok for t in ours), [t.error for t in ours]
    manifest = json.loads((tmp_path / "cache" / "bundles" / report.bundle.rsplit("/", 1)[1]
                           / "manifest.json").read_text())
    uses_kernels = "edgesmith_kernels=8" in report.best.id
    assert (LIBRARY in manifest["files"]) == uses_kernels
    rows = report.kernels           # per block, from ORT's fused QLinearConv nodes and ours
    assert len(rows) == 17 and all(r["onnxruntime_ms"] > 0 for r in rows), rows
    assert all(r["verdict"].startswith(("won", "lost", "tie", "too small")) for r in rows)


def test_random_grids_equal_onnxruntime_and_a_bias_beyond_exact_float_stays_on_onnxruntime():
    """Blocks written straight as QDQ graphs with grids a quantizer would rarely pick (any
    zero point, scales over four decades, weights at -128): the saturating paths too."""
    library = build(HOST)[0]
    rng = np.random.default_rng(7)
    bits = 7 if SATURATES else 8
    for case in range(36):
        c, e, o = (int(v) for v in rng.integers(1, 70, 3))
        stem = int(rng.choice([0, 0, 1, 2]))
        residual = not stem and rng.random() < 0.4
        model, x = qdq_block(rng, 3 if stem else c, e, c if residual else o,
                             stride=1 if residual else int(rng.choice([1, 2])),
                             residual=residual, stem_stride=stem, batch=int(rng.integers(1, 3)),
                             h=int(rng.integers(1, 20)), w=int(rng.integers(1, 20)),
                             weight_bits=bits)
        fused, report = fuse_int8_inverted_residual(model)
        assert report.changed == 1, (case, report.details)
        equal, steps = int8_agreement(model, fused, {"x": spec(list(x.shape))}, library,
                                      report.metrics["blocks"], {"x": x})
        assert equal == 1.0 and steps == 0, (case, c, e, o, stem, residual, equal, steps)
    # a residual add whose rounding depends on the order of MLAS's fused multiply-adds (20 of
    # its elements were one step off when the kernel added the products in another order)
    model, x = qdq_block(np.random.default_rng(685278392), 13, 54, 13, residual=True, batch=2,
                         h=30, w=40, weight_bits=bits)
    fused, report = fuse_int8_inverted_residual(model)
    assert int8_agreement(model, fused, {"x": spec(list(x.shape))}, library,
                          report.metrics["blocks"], {"x": x}) == (1.0, 0.0)
    model, _ = qdq_block(rng, 8, 16, 8, big_bias=True)
    report = fuse_int8_inverted_residual(model)[1]
    assert report.changed == 0 and "beyond the kernel's exact range" in report.details[0]


def test_the_avx2_build_takes_a_tile_per_conv_for_7_and_8_bit_weights(monkeypatch):
    """AVX2 runs 7-bit weights (|w| <= 64) on vpmaddubsw, 8-bit ones widened to int16, chosen
    per conv: an expand and a project of different widths in one block, on the band path and
    on the channel split of a small image (whose panel offsets follow each conv's width)."""
    if SATURATES:
        pytest.skip("onnxruntime here saturates 8-bit weights: no exact reference for them")
    library = build_for("avx2", monkeypatch)
    rng = np.random.default_rng(11)
    for bits in [(7, 8), (8, 7), (7, 7)]:
        for c, e, o, h, w, residual in [(24, 72, 40, 14, 7, False), (16, 96, 16, 21, 19, True),
                                        (3, 32, 16, 9, 9, False)]:
            model, x = qdq_block(rng, c, e, o, residual=residual, h=h, w=w, weight_bits=bits,
                                 stem_stride=2 if c == 3 else 0)
            fused, report = fuse_int8_inverted_residual(model)
            assert report.changed == 1, report.details
            got = int8_agreement(model, fused, {"x": spec(list(x.shape))}, library,
                                 report.metrics["blocks"], {"x": x})
            assert got == (1.0, 0.0), (bits, c, e, o, h, w, got)


def test_the_x86_build_follows_the_cpu_flags_and_an_older_compiler(tmp_path, monkeypatch):
    """AVX-512 VNNI first (Sapphire Rapids and Zen 5 have AVX-VNNI too), then AVX-VNNI (the
    N100, Alder Lake), then AVX2; a compiler that does not know -mavxvnni (before GCC 11)
    builds the AVX2 path rather than failing the build on the very CPUs that had one."""
    from edgesmith.own_kernels import isa_flags, toolchain

    both = ["avx512f", "avx2", "fma", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni"]
    assert isa_flags({"arch": "x86_64", "cpu_flags": both})[0] == "avx512"
    client = {"arch": "x86_64", "cpu_flags": ["avx2", "fma", "avx_vnni"]}
    assert toolchain(client).isa == "avx-vnni"
    old = tmp_path / "gcc-10"
    old.write_text('#!/bin/sh\nfor a; do [ "$a" = -mavxvnni ] && { echo "cc1: error: '
                   'unrecognized command-line option \'-mavxvnni\'" >&2; exit 1; }; done\n'
                   f'exec {os.environ.get("CC", "cc")} "$@"\n')
    old.chmod(0o755)
    monkeypatch.setenv("CC", str(old))
    tc = toolchain(client)
    assert tc.isa == "avx2" and "-mavxvnni" not in tc.flags, tc


def test_what_onnxruntime_computes_otherwise_stays_on_onnxruntime_and_says_why():
    """A float bias (onnxruntime adds it in float), a 3x3 expand without pads, int8
    activations: not the kernel's arithmetic, each refused in words. Two blocks reading one
    tensor share its Transpose and stay a valid graph."""
    def refusal(model) -> str:
        fused, report = fuse_int8_inverted_residual(model)
        assert report.changed == 0, report.details
        return report.details[0]

    rng = np.random.default_rng(11)
    model, _ = qdq_block(rng, 8, 16, 8)
    bias_dq = next(n for n in model.graph.node if n.output[0] == "expand_bdq")
    model.graph.node.remove(bias_dq)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(16, np.float32), "expand_bdq"))
    assert "the expand conv's bias is not quantized to int32" in refusal(model)
    model, _ = qdq_block(rng, 3, 16, 8, stem_stride=1)
    stem = next(n for n in model.graph.node if n.name == "" and n.output[0] == "expand")
    next(a for a in stem.attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
    assert "neither a 1x1 nor a 3x3 with pads of 1" in refusal(model)
    s8 = qdq(block_model(MIXED[:1], 9, 9), [1, 8, 9, 9],
             QuantRecipe("qdq-s8s8", activations="S8"))
    assert "is int8 (the kernel takes uint8 activations" in refusal(s8)

    model, x = qdq_block(rng, 8, 24, 8, weight_bits=7 if SATURATES else 8)   # a second branch
    branch = onnx.ModelProto()
    branch.CopyFrom(model)
    shared = {"x", "in_q", "in_dq", "in_s", "in_z"}
    rename = {n: n if n in shared else f"b_{n}" for node in branch.graph.node
              for n in [*node.input, *node.output]} | {t.name: f"b_{t.name}" for t in
                                                       branch.graph.initializer}
    for node in branch.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for t in branch.graph.initializer:
        t.name = rename[t.name]
    model.graph.node.extend(n for n in branch.graph.node if n.output[0] not in shared)
    model.graph.initializer.extend(branch.graph.initializer)
    model.graph.output.append(helper.make_tensor_value_info(
        rename[model.graph.output[0].name], TensorProto.FLOAT, None))
    fused, report = fuse_int8_inverted_residual(model)
    assert report.changed == 2
    assert [n.op_type for n in fused.graph.node].count("Transpose") == 3    # in: 1, out: 2
    assert int8_agreement(model, fused, {"x": spec(list(x.shape))}, build(HOST)[0],
                          report.metrics["blocks"], {"x": x}) == (1.0, 0.0)


def test_optimize_weighs_each_fast_candidate_on_the_kernels_as_a_candidate_of_its_own(
        models, tmp_path):
    """Before: optimize chose among models on onnxruntime's kernels and tuned only the winner,
    so an fp32 pick was never weighed against int8 on edgesmith's kernels. Now the fastest
    in-budget candidates are also measured and judged on the kernels (`<id>+kernels`: the same
    model file, a bundle that runs the kernels); not tuned, the winner ships as measured."""
    from edgesmith.pipeline import OptimizeConfig, optimize

    out, eval_path = tmp_path / "out", models / "digits_mnv2_eval.npz"
    cfg = OptimizeConfig(tune_budget_s=0, backends=("onnxruntime",), quant_effort="fast",
                         budget_s=1800)

    def stop_before_the_choice(text):
        if text.startswith("re-measuring the original"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(models / "digits_mnv2.onnx", out, eval_path=eval_path, cfg=cfg,
                 say=stop_before_the_choice)
    seen: list[str] = []    # resumed: every candidate, the kernels' too, once and not measured
    report = optimize(models / "digits_mnv2.onnx", out, eval_path=eval_path, cfg=cfg,
                      say=seen.append)
    assert not [s for s in seen if s.startswith("measuring ")], seen
    assert len({c.id for c in report.candidates}) == len(report.candidates), report.candidates
    cands = {c.id: c for c in report.candidates}
    ours = [c for c in report.candidates if c.id.endswith("+kernels") and c.ok]
    assert any(c.id.startswith("int8:") for c in ours), [(s["id"], s["reason"])
                                                          for s in report.skipped]
    for c in ours:
        parent = cands[c.id.removesuffix("+kernels")]
        assert c.model_sha256 == parent.model_sha256 and c.config["custom_op_libraries"]
        assert c.recipe == {**parent.recipe, "edgesmith_kernels": "0@1"}
        if c.id.startswith("int8:"):    # the QDQ model's own grid: the device judged it alike
            assert c.accuracy_drop == parent.accuracy_drop, (c.accuracy, parent.accuracy)
            assert abs(c.accuracy["sqnr_db"] - parent.accuracy["sqnr_db"]) < 0.5
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    shipped = report.chosen.endswith("+kernels")
    assert (out / "bundle" / LIBRARY).is_file() == shipped, report.chosen
    assert manifest["config"].get("custom_op_libraries") == ([LIBRARY] if shipped else None)
    # model.onnx stays the portable model: plain onnxruntime runs it
    import onnxruntime as ort

    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
