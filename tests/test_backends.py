"""Backend choice from probe results, the fp16 NaN fallback, and the ORT IOBinding session on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from sdtrt.cli import main
from sdtrt.engine.backends import BACKENDS, Probe, choose_backend, probe, select_backend
from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError, ManifestError
from sdtrt.engine.fallback import Fp32Fallback
from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.openvino_session import default_compute
from sdtrt.engine.ort_cuda import EAGER, OrtCudaSession
from sdtrt.engine.ort_session import OrtCpuSession

FOUND = {
    "tensorrt": Probe(True, "TensorRT 10.8.0.43"),
    "gpu": Probe(True, "NVIDIA H100 80GB HBM3 (sm90)"),
    "ort-cuda": Probe(True, "ONNX Runtime 1.31.1 CUDA"),
    "ort-cpu": Probe(True, "ONNX Runtime 1.31.1 CPU"),
    "openvino": Probe(True, "OpenVINO 2026.4.1 CPU, native bf16"),
}
NO_OPENVINO = Probe(False, "openvino is not installed: pip install 'sdtrt[cpu]'")
NO_TRT = Probe(False, "tensorrt is not installed: pip install 'sdtrt[gpu]'")
NO_GPU = Probe(False, "no CUDA GPU found")
NO_ORT_CUDA = Probe(False, "onnxruntime has no CUDA provider: pip install 'sdtrt[gpu]' (onnxruntime-gpu)")


def _machine(**missing: Probe):
    """probe(need) of a machine where the needs in ``missing`` fail; records what was asked."""
    results = {**FOUND, **{need.replace("_", "-"): p for need, p in missing.items()}}
    asked: list[str] = []

    def probe(need: str) -> Probe:
        asked.append(need)
        return results[need]

    probe.asked = asked
    return probe


def test_auto_prefers_tensorrt_then_ort_cuda_then_openvino_then_ort_cpu() -> None:
    assert select_backend("auto", _machine()) == ("trt", "TensorRT 10.8.0.43, NVIDIA H100 80GB HBM3 (sm90)")
    kind, reason = select_backend("auto", _machine(tensorrt=NO_TRT))
    assert kind == "ort-cuda"
    assert reason == f"ONNX Runtime 1.31.1 CUDA, NVIDIA H100 80GB HBM3 (sm90); trt skipped: {NO_TRT.detail}"
    kind, reason = select_backend("auto", _machine(gpu=NO_GPU))
    assert kind == "openvino"
    assert reason == (
        "OpenVINO 2026.4.1 CPU, native bf16; trt skipped: no CUDA GPU found; ort-cuda skipped: no CUDA GPU found"
    )
    kind, reason = select_backend("auto", _machine(gpu=NO_GPU, openvino=NO_OPENVINO))
    assert kind == "ort-cpu"
    assert (
        reason.startswith("ONNX Runtime 1.31.1 CPU; trt skipped")
        and f"openvino skipped: {NO_OPENVINO.detail}" in reason
    )
    kind, reason = select_backend("auto", _machine(tensorrt=NO_TRT, ort_cuda=NO_ORT_CUDA, openvino=NO_OPENVINO))
    assert kind == "ort-cpu" and "ort-cuda skipped: onnxruntime has no CUDA provider" in reason
    with pytest.raises(BackendUnavailableError, match="no backend is available"):
        missing = {"ort_cpu": Probe(False, "onnxruntime is missing"), "openvino": NO_OPENVINO}
        select_backend("auto", _machine(tensorrt=NO_TRT, gpu=NO_GPU, **missing))


def test_compute_precision_is_the_backends_choice() -> None:
    """openvino offers bf16 and fp32; the others run at their ONNX variant's precision only."""
    openvino, ort_cpu = BACKENDS["openvino"], BACKENDS["ort-cpu"]
    assert openvino.compute("fp32") == "fp32" and openvino.compute("bf16") == "bf16"
    assert ort_cpu.compute(None) == "fp32" and BACKENDS["trt"].compute(None) == "fp16"
    with pytest.raises(InvalidInputError, match="backend ort-cpu runs at fp32 or int8, not 'bf16'"):
        ort_cpu.compute("bf16")
    with pytest.raises(InvalidInputError, match="backend openvino runs at bf16, fp32 or int8, not 'fp16'"):
        openvino.compute("fp16")


def test_explicit_backend_names_what_is_missing() -> None:
    assert select_backend("ort-cuda", _machine(tensorrt=NO_TRT)) == ("ort-cuda", "requested")
    with pytest.raises(BackendUnavailableError) as info:
        select_backend("trt", _machine(tensorrt=NO_TRT, gpu=NO_GPU))
    assert str(info.value) == f"backend 'trt' is unavailable: {NO_TRT.detail}; no CUDA GPU found"
    with pytest.raises(BackendUnavailableError, match="'ort-cuda' is unavailable: onnxruntime has no CUDA provider"):
        select_backend("ort-cuda", _machine(ort_cuda=NO_ORT_CUDA))
    with pytest.raises(InvalidInputError, match="unknown backend 'cuda'"):
        select_backend("cuda", _machine())


def test_cpu_request_never_probes_the_gpu() -> None:
    machine = _machine()
    assert select_backend("ort-cpu", machine) == ("ort-cpu", "requested")
    assert machine.asked == ["ort-cpu"]


def test_choose_backend_gives_tensorrt_a_device_scope() -> None:
    trt = choose_backend("auto", probe=_machine())
    assert (trt.kind, trt.precision) == ("trt", "fp16") and trt.scope is not None
    assert trt.scope.stream is None  # no CUDA call until a session opens
    ort_cuda = choose_backend("auto", probe=_machine(tensorrt=NO_TRT))
    assert (ort_cuda.kind, ort_cuda.precision, ort_cuda.scope) == ("ort-cuda", "fp16", None)


def test_choice_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    if probe("gpu").ok:
        pytest.skip("this machine has a GPU: tests/test_gpu.py covers it")
    with caplog.at_level(logging.INFO, logger="sdtrt.engine.backends"):
        choice = choose_backend("auto")
    expected = ("openvino", "fp32", default_compute()) if probe("openvino").ok else ("ort-cpu", "fp32", "fp32")
    assert (choice.kind, choice.precision, choice.compute) == expected
    assert "trt skipped" in choice.reason and "ort-cuda skipped" in choice.reason
    assert f"backend {choice.kind} (fp32 ONNX, {choice.compute} compute): {choice.reason}" in caplog.text
    with pytest.raises(BackendUnavailableError, match="backend 'ort-cuda' is unavailable"):
        choose_backend("ort-cuda")


def _exp_log_model(path: Path, fp16: bool) -> Path:
    """y = log(exp(x)); the fp16 variant keeps exp(x) in fp16, so it overflows for x > 11.1."""
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    if fp16:
        nodes = [
            helper.make_node("Cast", ["x"], ["a"], to=f32),
            helper.make_node("Exp", ["a"], ["b"]),
            helper.make_node("Cast", ["b"], ["c"], to=f16),  # (batch, 2) float16: inf past 65504
            helper.make_node("Cast", ["c"], ["d"], to=f32),
            helper.make_node("Log", ["d"], ["e"]),
            helper.make_node("Cast", ["e"], ["y"], to=f16),
        ]
    else:
        nodes = [helper.make_node("Exp", ["x"], ["b"]), helper.make_node("Log", ["b"], ["y"])]
    dtype = f16 if fp16 else f32
    graph = helper.make_graph(
        nodes,
        "exp_log",
        [helper.make_tensor_value_info("x", dtype, ["batch", 2])],
        [helper.make_tensor_value_info("y", dtype, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_fp16_overflow_falls_back_to_fp32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    opened: list[OrtCpuSession] = []

    def open_fp32() -> OrtCpuSession:
        opened.append(OrtCpuSession(_exp_log_model(tmp_path / "fp32.onnx", fp16=False), threads=1))
        return opened[-1]

    fp16 = OrtCpuSession(_exp_log_model(tmp_path / "fp16.onnx", fp16=True), threads=1)
    guarded = Fp32Fallback(fp16, open_fp32, "vae_decoder")
    assert guarded.inputs == fp16.inputs and guarded.outputs == fp16.outputs

    small = guarded.run({"x": np.array([[1, 2]], np.float16)})["y"]
    np.testing.assert_allclose(small, [[1, 2]], atol=1e-2)
    assert opened == []  # finite at fp16: the fp32 twin is never loaded

    big = {"x": np.array([[1, 12]], np.float16)}
    assert not np.isfinite(fp16.run(big)["y"]).all()  # the overflow is real
    with caplog.at_level(logging.WARNING, logger="sdtrt.engine.backends"):
        first = guarded.run(big)["y"]
        second = guarded.run(big)["y"]
    assert first.dtype == np.float16
    np.testing.assert_allclose(first, [[1, 12]], atol=1e-2)
    np.testing.assert_array_equal(first, second)
    assert len(opened) == 1
    assert caplog.text.count("produced NaN/inf at fp16") == 1  # warned once

    with pytest.raises(InvalidInputError, match="not finite at fp32 either"):
        guarded.run({"x": np.array([[np.nan, 1]], np.float16)})
    guarded.close()

    without_fp32 = Fp32Fallback(OrtCpuSession(tmp_path / "fp16.onnx", threads=1), None, "vae_decoder")
    with pytest.raises(ManifestError, match="no fp32 vae_decoder to fall back to: re-export with --precision fp32"):
        without_fp32.run(big)


def test_iobinding_session_on_the_cpu_provider(tiny_export: Path) -> None:
    """OrtCudaSession's buffer and graph-id bookkeeping, run for real on ONNX Runtime's CPU provider."""
    path = tiny_export / load_manifest(tiny_export).components["unet"].files["fp32"].path
    bound = OrtCudaSession(path, device="cpu")
    plain = OrtCpuSession(path, threads=1)
    assert bound.inputs == plain.inputs and bound.outputs == plain.outputs and not bound.cuda_graph
    rng = np.random.default_rng(0)
    previous = None
    for shape in [(2, 4, 16, 16)] * 3 + [(1, 4, 32, 16)] * 2:
        feeds = {
            "sample": rng.standard_normal(shape, dtype=np.float32),
            "timestep": np.full(shape[0], 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((shape[0], 77, 32), dtype=np.float32),
        }
        out = bound.run(feeds)["noise_pred"]
        np.testing.assert_array_equal(out, plain.run(feeds)["noise_pred"])
        assert previous is None or not np.shares_memory(out, previous)  # the caller owns each result
        previous = out
    assert sorted(bound.graph_ids) == [
        ((1, 4, 32, 16), (1,), (1, 77, 32)),
        ((2, 4, 16, 16), (2,), (2, 77, 32)),
    ]
    assert set(bound.graph_ids.values()) == {EAGER}  # no CUDA graphs on the CPU
    with pytest.raises(InvalidInputError, match="'timestep' is float16, expected float32"):
        bound.run({**feeds, "timestep": feeds["timestep"].astype(np.float16)})
    bound.close()


def test_build_command_errors(tiny_export: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-q", "build", str(tiny_export), "--static", "120x128"]) == 2
    assert "height 120 is not a multiple of 16" in capsys.readouterr().err
    if probe("tensorrt").ok:
        return
    assert main(["-q", "build", str(tiny_export)]) == 2
    assert "sdtrt: error: tensorrt is not installed: pip install 'sdtrt[gpu]'" in capsys.readouterr().err
