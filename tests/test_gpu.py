"""On an NVIDIA GPU: the CUDA layer, ONNX Runtime CUDA and TensorRT against the CPU path.

Run with ``pytest -m gpu tests/test_gpu.py``. Each group skips with the reason where its needs are
missing (no GPU, no onnxruntime-gpu, no tensorrt).

Tolerances: the GPU runs the fp16 export, the reference is ONNX Runtime on the CPU at fp32. A
network's output may differ by FP16_TOL of its largest magnitude (the fp16 export measured 0.24%
on the CPU; 2% leaves room for fp16 accumulation on the GPU). Graph replays and eager runs of the
same engine execute the same kernels, so they are compared at REPLAY_TOL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine import cuda
from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.backends import choose_backend, probe
from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError
from sdtrt.engine.manifest import Manifest, load_manifest
from sdtrt.engine.ort_session import OrtCpuSession
from sdtrt.runtime.pipeline import Pipeline

pytestmark = pytest.mark.gpu

FP16_TOL = 2e-2  # max |gpu - cpu| <= FP16_TOL * max(1, max |cpu|)
REPLAY_TOL = 2e-3  # the same, between a graph replay and an eager run
PIXEL_MEAN_TOL = 2.0  # mean |gpu - cpu| of the 8-bit end-to-end image
SIDE = 16  # latent side of the tiny model's requests (128 px)


def _needs(*needs: str) -> None:
    for need in needs:
        result = probe(need)
        if not result.ok:
            pytest.skip(f"needs {need}: {result.detail}")


# Session-scoped gates: listed before tiny_export, they skip before the export is built.
@pytest.fixture(scope="session")
def gpu() -> None:
    _needs("gpu")


@pytest.fixture(scope="session")
def ort_cuda(gpu: None) -> None:
    _needs("ort-cuda")


@pytest.fixture(scope="session")
def tensorrt(gpu: None) -> None:
    _needs("tensorrt")


def _feeds(manifest: Manifest, component: str, rng: np.random.Generator, batch: int = 2, side: int = SIDE) -> dict:
    """Random fp32 inputs of ``component`` (token ids for the text encoder, a mid timestep for the UNet)."""
    dims = {"batch": batch, "latent_height": side, "latent_width": side, "height": 8 * side, "width": 8 * side}
    feeds = {}
    for spec in manifest.components[component].files["fp32"].inputs:
        shape = spec.bind(dims)
        if spec.dtype == "int32":
            feeds[spec.name] = rng.integers(0, 1000, shape).astype(np.int32)
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _cast(session, feeds: dict) -> dict:
    return {n: a.astype(session.inputs[n].dtype) for n, a in feeds.items()}


def _assert_close(got: dict, want: dict, tol: float) -> None:
    for name, ref in want.items():
        ref = ref.astype(np.float32)
        err = np.abs(got[name].astype(np.float32) - ref).max()
        assert err <= tol * max(1.0, float(np.abs(ref).max())), f"{name}: max error {err:.3g}"


def _cpu_reference(folder: Path, manifest: Manifest, component: str, feeds: dict) -> dict:
    return OrtCpuSession(folder / manifest.components[component].files["fp32"].path).run(feeds)


def _image_parity(folder: Path, backend: str) -> None:
    options = {"num_inference_steps": 4, "seed": 7, "height": 8 * SIDE, "width": 8 * SIDE, "guidance_scale": 7.5}
    with Pipeline.load(folder, backend="ort-cpu") as cpu, Pipeline.load(folder, backend=backend) as gpu:
        want, got = cpu.txt2img("a red circle", **options), gpu.txt2img("a red circle", **options)
    assert got.backend == backend
    _assert_close({"latents": got.latents}, {"latents": want.latents}, 5 * FP16_TOL)
    diff = np.abs(np.asarray(got.images[0], np.float32) - np.asarray(want.images[0], np.float32))
    assert diff.mean() <= PIXEL_MEAN_TOL, f"mean pixel difference {diff.mean():.2f}"


# --- the CUDA layer ---------------------------------------------------------------------------------


def test_cuda_graph_replay_equals_eager(gpu: None) -> None:
    rt = cuda.cudart()
    rng = np.random.default_rng(0)
    stream = cuda.Stream()
    graphs = cuda.GraphCache(stream, "copy")
    buffers = []
    try:
        for count in (1024, 4096):  # two shapes, two graphs
            nbytes = 4 * count
            src, dst = cuda.DeviceBuffer(nbytes), cuda.DeviceBuffer(nbytes)
            host = cuda.PinnedBuffer(nbytes)
            buffers += [src, dst, host]

            def enqueue(src=src, dst=dst, nbytes=nbytes) -> None:  # dst = first half of src, then zeros
                cuda.check(rt.cudaMemsetAsync(dst.ptr, 0, nbytes, stream.handle), "cudaMemsetAsync")
                kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
                cuda.check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes // 2, kind, stream.handle), "cudaMemcpyAsync")

            for call in range(4):  # one eager warm-up (then capture), three replays on fresh inputs
                x = rng.standard_normal(count, dtype=np.float32)
                np.copyto(host.array((count,), np.float32), x)
                cuda.copy_to_device(src, host, nbytes, stream)
                graphs.run((count,), enqueue)
                cuda.copy_to_host(host, dst, nbytes, stream)
                stream.synchronize()
                want = np.concatenate([x[: count // 2], np.zeros(count - count // 2, np.float32)])
                np.testing.assert_array_equal(host.array((count,), np.float32), want, err_msg=f"call {call}")
        assert len(graphs) == 2
    finally:
        graphs.close()
        for buffer in buffers:
            buffer.close()
        stream.close()


# --- ONNX Runtime CUDA --------------------------------------------------------------------------------


def test_ort_cuda_graph_replay_equals_eager(ort_cuda: None, tiny_export: Path) -> None:
    from sdtrt.engine.ort_cuda import OrtCudaSession

    manifest = load_manifest(tiny_export)
    path = tiny_export / manifest.components["unet"].files["fp16"].path
    graphed, eager = OrtCudaSession(path, cuda_graph=True), OrtCudaSession(path, cuda_graph=False)
    assert graphed.cuda_graph, "ONNX Runtime refused CUDA graphs for the tiny UNet"
    rng = np.random.default_rng(1)
    for side in (SIDE, 2 * SIDE):  # the second shape gets its own graph
        for _ in range(4):  # the first call of a shape is eager; graphs are captured, then replayed
            feeds = _cast(graphed, _feeds(manifest, "unet", rng, side=side))
            _assert_close(graphed.run(feeds), eager.run(feeds), REPLAY_TOL)
    assert graphed.cuda_graph, "ONNX Runtime refused to capture the tiny UNet"
    ids = sorted(graphed.graph_ids.values())
    assert len(ids) == 2 and ids[0] > 0 and ids[0] != ids[1]
    graphed.close()
    eager.close()


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_ort_cuda_matches_ort_cpu(ort_cuda: None, tiny_export: Path, component: str) -> None:
    manifest = load_manifest(tiny_export)
    session = open_artifact(tiny_export, "ort-cuda").session(component)
    feeds = _feeds(manifest, component, np.random.default_rng(2))
    _assert_close(session.run(_cast(session, feeds)), _cpu_reference(tiny_export, manifest, component, feeds), FP16_TOL)
    session.close()


def test_ort_cuda_image_parity(ort_cuda: None, tiny_export: Path) -> None:
    _image_parity(tiny_export, "ort-cuda")


# --- TensorRT -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_export(tensorrt: None, tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny export (ONNX files linked) with static 128x128 and default dynamic plans built."""
    from sdtrt.engine.profiles import static_profile
    from sdtrt.engine.trt_build import build_engines

    folder = tmp_path_factory.mktemp("trt") / "tiny-sd1"
    shutil.copytree(tiny_export, folder, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    manifest = load_manifest(folder)
    build_engines(folder, static_profile(manifest, (8 * SIDE, 8 * SIDE), 1), workspace_gib=1, progress=False)
    build_engines(folder, progress=False)
    return folder


def _trt_session(folder: Path, component: str, **options):
    from sdtrt.engine.trt_session import open_trt_session

    choice = choose_backend("trt")
    return open_trt_session(folder, load_manifest(folder), component, "fp16", choice.scope, **options)


def test_trt_plans_are_cached(trt_export: Path) -> None:
    from sdtrt.engine.profiles import static_profile
    from sdtrt.engine.trt_build import build_engines

    manifest = load_manifest(trt_export)
    spec = static_profile(manifest, (8 * SIDE, 8 * SIDE), 1)
    plans = sorted((trt_export / "trt").glob("*/*.plan"))
    assert len(plans) == 2 * 5  # 4 networks + the fp32 VAE decoder, two profiles
    stamps = {p: p.stat().st_mtime_ns for p in plans}
    again = build_engines(trt_export, spec, progress=False)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in again)  # found, not rebuilt
    assert (again[0].parent / "timing.cache").stat().st_size > 0


def test_trt_replay_equals_eager_and_matches_ort_cpu(trt_export: Path) -> None:
    manifest = load_manifest(trt_export)
    rng = np.random.default_rng(3)
    session = _trt_session(trt_export, "unet", profile=None)
    first = _cast(session, _feeds(manifest, "unet", rng))
    eager = session.run(first)  # the first call of a shape runs eagerly, then captures
    for _ in range(3):
        feeds = _feeds(manifest, "unet", rng)
        reference = _cpu_reference(trt_export, manifest, "unet", feeds)
        _assert_close(session.run(_cast(session, feeds)), reference, FP16_TOL)
    _assert_close(session.run(first), eager, REPLAY_TOL)
    session.run(_cast(session, _feeds(manifest, "unet", rng, side=2 * SIDE)))
    assert len(session._graphs) == 2
    session.close()


@pytest.mark.parametrize("component", ["text_encoder", "vae_decoder", "vae_encoder"])
def test_trt_matches_ort_cpu(trt_export: Path, component: str) -> None:
    manifest = load_manifest(trt_export)
    session = _trt_session(trt_export, component)
    feeds = _feeds(manifest, component, np.random.default_rng(4))
    _assert_close(session.run(_cast(session, feeds)), _cpu_reference(trt_export, manifest, component, feeds), FP16_TOL)
    session.close()


def test_trt_request_outside_the_profile(trt_export: Path) -> None:
    from sdtrt.engine.profiles import static_profile

    manifest = load_manifest(trt_export)
    session = _trt_session(trt_export, "unet", profile=static_profile(manifest, (8 * SIDE, 8 * SIDE), 1))
    feeds = _cast(session, _feeds(manifest, "unet", np.random.default_rng(5), side=2 * SIDE))
    with pytest.raises(InvalidInputError, match=rf"--static {16 * SIDE}x{16 * SIDE} --batch 1$"):
        session.run(feeds)
    session.close()


def test_trt_refuses_a_plan_of_another_version(trt_export: Path, tmp_path: Path) -> None:
    import json

    folder = tmp_path / "export"
    shutil.copytree(trt_export, folder, symlinks=True)
    for sidecar in (folder / "trt").glob("*/unet.*.json"):
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "trt_version": "9.0.0"}))
    with pytest.raises(
        BackendUnavailableError,
        match=r"no loadable TensorRT plan for unet .*built by TensorRT 9\.0\.0.*: build it with: sdtrt build",
    ):
        _trt_session(folder, "unet", build=False)


def test_trt_sessions_share_one_activation_buffer(trt_export: Path) -> None:
    with Pipeline.load(trt_export, backend="trt") as pipe:
        scope = pipe.backend.scope
        sessions = [pipe.session(c) for c in ("text_encoder", "unet", "vae_decoder")]
        assert scope.stream is not None and scope.activations.nbytes > 0
        assert all(s._scope is scope for s in sessions if hasattr(s, "_scope"))
    assert scope.stream is None  # the last session's close freed the stream and the memory


def test_trt_image_parity(trt_export: Path) -> None:
    _image_parity(trt_export, "trt")
