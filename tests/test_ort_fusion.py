"""ONNX Runtime's fused graphs (export --ort-fused): what fused, the CPU graph against the plain export and
against diffusers, and which graph each backend runs."""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_controlnet import (  # the ControlNet parity suite's references and fixture
    assert_parity,
    control_image,
    diffusers_controlnet,
    reference_outputs,
    tiny_controlnet_dirs,  # noqa: F401 - a fixture
)
from test_gpu import gpu, ort_cuda  # noqa: F401 - fixtures: skip GPU tests before the export is built
from test_pipeline import (  # the parity suite's references and bounds
    LATENT_TOLERANCE,
    NEGATIVE,
    PIXEL_TOLERANCE,
    PIXELS_OFF_BY_ONE,
    PROMPT,
    diffusers_pipe,  # noqa: F401 - a fixture
)

from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.backends import BackendChoice, component_fused
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Component, read_manifest
from sdtrt.engine.ort_cuda import CudaProviderOptions
from sdtrt.engine.ort_session import OrtCpuSession
from sdtrt.runtime.pipeline import Pipeline

# the tiny UNet's attention layers: down block 1 transformer, mid block 1, up block 2; self + cross each
TINY_UNET_ATTENTION = 8
CPU_PARITY = 1e-4  # max |fused - plain| / max |plain|, fp32 on the CPU (measured: ~1e-6)
GPU_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")


@pytest.fixture(scope="module")
def fused_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's networks txt2img runs, with ONNX Runtime's fused graphs, fp32 and fp16."""
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-sd1-fused"
    components = ("text_encoder", "unet", "vae_decoder")
    export_model(
        tiny_model_dir, out, precisions=("fp32", "fp16"), components=components, progress=False, ort_fused=True
    )
    return out


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def test_every_attention_layer_fuses(fused_export: Path, tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert sum(isinstance(m, Attention) for m in unet.modules()) == TINY_UNET_ATTENTION
    manifest = read_manifest(fused_export)
    for_cuda, for_cpu = (manifest.components["unet"].ort_fused[p] for p in ("fp16", "fp32"))
    for file in (for_cuda, for_cpu):
        assert file.fusion["attention_layers"] == file.fusion["fused_attention"] == TINY_UNET_ATTENTION
        assert file.weights is None  # ORT's fusions pack and transpose weights: LoRA runs the plain graph
        found = _ops(fused_export / file.path)  # the manifest's counts are the file's
        assert {op: found[op] for op in file.fusion["ops"]} == file.fusion["ops"]
        assert found["Softmax"] == 0
    # the CUDA provider's graph: every attention a MultiHeadAttention, and the CUDA-only fusions
    assert for_cuda.fusion["ops"]["MultiHeadAttention"] == TINY_UNET_ATTENTION
    assert all(for_cuda.fusion["ops"][op] > 0 for op in GPU_ONLY_OPS)
    # the CPU provider's graph: only ops it has kernels for
    assert all(for_cpu.fusion["ops"][op] == 0 for op in GPU_ONLY_OPS)
    assert for_cpu.fusion["ops"]["SkipLayerNormalization"] > 0
    decoder = manifest.components["vae_decoder"].ort_fused
    assert list(decoder) == ["fp16"]  # the CPU runs the plain VAE (export/ort_fusion.py)
    # its attention is left to the CUDA provider: ORT's VAE attention fusion drops the q/k/v biases
    assert decoder["fp16"].fusion["attention_layers"] == 1 and decoder["fp16"].fusion["fused_attention"] == 0
    assert decoder["fp16"].fusion["attention_asked"] is False
    assert decoder["fp16"].fusion["ops"]["GroupNorm"] > 0 and decoder["fp16"].fusion["ops"]["NhwcConv"] > 0
    assert manifest.components["text_encoder"].ort_fused == {}


def test_the_gpu_graph_is_fp16_with_fp32_where_it_must(fused_export: Path) -> None:
    manifest = read_manifest(fused_export)
    for name in ("unet", "vae_decoder"):
        file = manifest.components[name].ort_fused["fp16"]
        model = onnx.load(str(fused_export / file.path), load_external_data=False)
        dtypes = {
            v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in model.graph.input
        }
        assert dtypes == {spec.name: spec.dtype for spec in file.inputs}  # timestep stays float32
        initializers = {t.name: t for t in model.graph.initializer}
        weights = [t for t in initializers.values() if len(t.dims) == 4]  # convolution kernels
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
        resizes = [node for node in model.graph.node if node.op_type == "Resize"]
        assert resizes or name == "unet"
        for node in resizes:  # scales stay float32 initializers: a converted Constant would not load
            scales = initializers[node.input[2]]
            assert scales.data_type == onnx.TensorProto.FLOAT


def test_unfused_attention_is_found_for_its_fp32_island(fused_export: Path) -> None:
    """Where attention does not fuse on a network that overflows in fp16 (SD 2.x), each layer's Softmax and its
    two MatMuls stay fp32: found on the plain graph, where none is fused."""
    from sdtrt.export.ort_fusion import _attention_islands

    model = onnx.load(str(fused_export / "unet.onnx"), load_external_data=False)
    kinds = collections.Counter(node.op_type for node in model.graph.node if node.name in _attention_islands(model))
    assert kinds["Softmax"] == TINY_UNET_ATTENTION and kinds["MatMul"] == 2 * TINY_UNET_ATTENTION


def test_the_cpu_graph_matches_the_plain_export(fused_export: Path) -> None:
    manifest = read_manifest(fused_export)
    plain = OrtCpuSession(fused_export / manifest.component_file("unet", "fp32").path)
    fused = OrtCpuSession(fused_export / manifest.component_file("unet", "fp32", fused=True).path)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
        "timestep": np.array([981.0, 981.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    expected, got = plain.run(feeds)["noise_pred"], fused.run(feeds)["noise_pred"]
    assert np.abs(got - expected).max() / np.abs(expected).max() <= CPU_PARITY


def test_txt2img_on_the_fused_graph_matches_diffusers(fused_export: Path, diffusers_pipe) -> None:  # noqa: F811
    import diffusers
    import torch

    steps, latents = 8, np.random.default_rng(7).standard_normal((1, 4, 32, 32), dtype=np.float32)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": steps, "guidance_scale": 7.5}
    with Pipeline.load(fused_export, backend="ort-cpu") as pipe:
        ours = pipe.txt2img(PROMPT, latents=latents, scheduler="ddim", **options)
        assert pipe.artifact.fused("unet") and not pipe.artifact.fused("vae_decoder")
        assert pipe.artifact.file("unet").path == "unet.ort.onnx"
    final = {}  # diffusers' last latents, kept on the way to its image: one run gives both

    def keep(pipeline, step: int, timestep, tensors: dict) -> dict:
        final["latents"] = tensors["latents"].numpy()
        return tensors

    diffusers_pipe.scheduler = diffusers.DDIMScheduler.from_config(diffusers_pipe.model_scheduler_config)
    (image,) = diffusers_pipe(
        PROMPT, latents=torch.from_numpy(latents), callback_on_step_end=keep, output_type="pil", **options
    ).images
    expected = final["latents"]
    assert np.abs(ours.latents - expected).max() / np.abs(expected).max() < LATENT_TOLERANCE
    expected_image, ours_image = np.asarray(image, dtype=np.int16), np.asarray(ours.images[0], dtype=np.int16)
    assert np.abs(ours_image - expected_image).max() <= PIXEL_TOLERANCE
    assert (ours_image != expected_image).mean() <= PIXELS_OFF_BY_ONE
    assert ours_image.std() > 10  # a real picture


@pytest.fixture(scope="module")
def fused_controlnet_export(
    fused_export: Path,
    tiny_controlnet_dirs: dict[str, Path],  # noqa: F811 - the fixture
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A copy of the fused export with the tiny ControlNet "edges" attached."""
    import shutil

    from sdtrt.export.controlnet import attach_controlnet

    export = shutil.copytree(fused_export, tmp_path_factory.mktemp("exports") / "fused-controlnet")
    attach_controlnet(export, tiny_controlnet_dirs["edges"], name="edges")
    return export


def test_controlnets_attach_with_fused_graphs_that_match_diffusers(
    fused_controlnet_export: Path,
    tiny_model_dir: Path,
    tiny_controlnet_dirs: dict[str, Path],  # noqa: F811 - the fixture
) -> None:
    """A ControlNet attached to an export made with --ort-fused gets fused graphs too, for itself and for the UNet
    that takes its residuals; ORT CPU runs both, as diffusers' ControlNet pipeline computes."""
    import torch

    export = fused_controlnet_export
    manifest = read_manifest(export)
    for name in ("unet_controlnet", "controlnet.edges"):
        fused = manifest.components[name].ort_fused
        assert sorted(fused) == ["fp16", "fp32"]
        for file in fused.values():
            assert file.fusion["fused_attention"] == file.fusion["attention_layers"] > 0
            assert (export / file.path).is_file()
    cuda_ops = manifest.components["controlnet.edges"].ort_fused["fp16"].fusion["ops"]
    assert cuda_ops["GroupNorm"] > 0 and cuda_ops["NhwcConv"] > 0
    reference = diffusers_controlnet(
        "StableDiffusionControlNetPipeline", tiny_model_dir, [tiny_controlnet_dirs["edges"]], "ddim"
    )
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    hint = control_image(0)
    options = {"negative_prompt": NEGATIVE, "num_inference_steps": 6, "guidance_scale": 7.5}

    def run(output_type: str):
        return reference(
            PROMPT,
            image=hint,
            latents=torch.from_numpy(latents),
            output_type=output_type,
            height=128,
            width=128,
            **options,
        )

    with Pipeline.load(export, backend="ort-cpu") as pipe:
        ours = pipe.txt2img(
            PROMPT, controlnet="edges", control_image=hint, latents=latents, scheduler="ddim", **options
        )
        assert pipe.artifact.fused("unet_controlnet") and pipe.artifact.fused("controlnet.edges")
        assert pipe.artifact.file("controlnet.edges").path == "controlnet.edges.ort.onnx"
    assert_parity(ours, *reference_outputs(run, reference), LATENT_TOLERANCE)


def test_lora_runs_the_plain_graph(fused_export: Path) -> None:
    """The fused graph has no weight map: asking for the weight maps (LoRA) switches the UNet back."""
    with open_artifact(fused_export, "ort-cpu") as artifact:
        artifact.session("unet")
        assert artifact.fused("unet") and artifact.weight_map("unet") is None
        maps = artifact.weight_maps()
        assert set(maps) == {"text_encoder", "unet"}
        assert not artifact.fused("unet") and not artifact.is_open("unet")
        assert artifact.file("unet").path == "unet.onnx"
        assert artifact.session("unet")._weight_map is maps["unet"]


def _manifest_with(export: Path, fused: dict[str, list[str]]):
    """The export's manifest with fused graphs declared at these precisions, its plain files standing in for
    them (pure logic)."""
    manifest = read_manifest(export)
    components = {
        name: Component(files=c.files, ort_fused={p: c.files[p] for p in fused.get(name, [])})
        for name, c in manifest.components.items()
    }
    return dataclasses.replace(manifest, components=components)


@pytest.mark.parametrize(
    ("kind", "precision", "fused_unet"),
    [("trt", "fp16", False), ("ort-cuda", "fp16", True), ("openvino", "fp32", False), ("ort-cpu", "fp32", True)],
)
def test_each_backend_names_its_graph(fused_export: Path, kind: str, precision: str, fused_unet: bool) -> None:
    manifest = _manifest_with(fused_export, {"unet": ["fp16", "fp32"], "vae_decoder": ["fp16"]})
    choice = BackendChoice(kind, precision, "test")
    assert component_fused(choice, manifest, "unet", precision) is fused_unet
    assert component_fused(choice, manifest, "text_encoder", precision) is False
    assert component_fused(choice, manifest, "vae_decoder", precision) is (fused_unet and precision == "fp16")


def test_ort_cuda_falls_back_to_the_plain_graph_with_a_note(
    fused_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = _manifest_with(fused_export, {})
    with caplog.at_level(logging.INFO, logger="sdtrt"):
        assert component_fused(BackendChoice("ort-cuda", "fp16", "test"), manifest, "unet", "fp16") is False
    assert "unet has no ONNX Runtime fused fp16 graph" in caplog.text and "--ort-fused" in caplog.text


def test_manifests_without_fused_graphs_read_and_write_as_before(fused_export: Path) -> None:
    raw = _manifest_with(fused_export, {}).components["unet"].to_dict()
    assert "ort_fused" not in raw and "fusion" not in raw["files"]["fp32"]
    assert Component.from_dict(raw).ort_fused == {}
    fused = read_manifest(fused_export).components["unet"]
    assert Component.from_dict(fused.to_dict()) == fused


def test_cuda_provider_options() -> None:
    defaults = CudaProviderOptions().provider_options(0, cuda_graph=True)
    assert defaults == {
        "device_id": "0",
        "enable_cuda_graph": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "0",
        "sdpa_kernel": "0",
        "arena_extend_strategy": "kSameAsRequested",
    }
    chosen = CudaProviderOptions.parse(" prefer_nhwc=1, sdpa_kernel=8,cudnn_conv_algo_search=HEURISTIC")
    assert chosen == CudaProviderOptions(cudnn_conv_algo_search="HEURISTIC", prefer_nhwc=True, sdpa_kernel=8)
    assert chosen.provider_options(1, cuda_graph=False)["enable_cuda_graph"] == "0"
    assert CudaProviderOptions.parse("") == CudaProviderOptions()
    for bad, message in [
        ("nhwc=1", "'nhwc=1' is not name=value with a name from cudnn_conv_algo_search"),
        ("prefer_nhwc=2", "prefer_nhwc is 0 or 1"),
        ("sdpa_kernel=flash", "sdpa_kernel takes an integer"),
        ("sdpa_kernel=300", "sdpa_kernel is a bitmask from 0 to 255"),
        ("cudnn_conv_algo_search=FAST", "cudnn_conv_algo_search must be one of EXHAUSTIVE, HEURISTIC, DEFAULT"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            CudaProviderOptions.parse(bad)


# --- on a GPU (pytest -m gpu): the fused fp16 graphs on ONNX Runtime CUDA --------------------------------
# fp16 tolerance: max |fused fp16 on CUDA - plain fp32 on the CPU| <= FP16_TOL * max(1, max |plain|), the
# bound tests/test_gpu.py holds the plain fp16 graph to (2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_fused_fp16_on_cuda_matches_the_plain_graph(
    ort_cuda: None,  # noqa: F811 - the fixture
    fused_export: Path,
    component: str,
) -> None:
    from test_gpu import FP16_TOL, _cast, _feeds

    manifest = read_manifest(fused_export)
    feeds = _feeds(manifest, component, np.random.default_rng(3), batch=2 if component == "unet" else 1)
    reference = OrtCpuSession(fused_export / manifest.component_file(component, "fp32").path).run(feeds)
    with open_artifact(fused_export, "ort-cuda") as artifact:
        assert artifact.fused(component)
        session = artifact.session(component)
        for _ in range(3):  # eager, then the captured graph replayed
            got = session.run(_cast(session, feeds))
            for name, expected in reference.items():
                error = np.abs(got[name].astype(np.float32) - expected).max()
                assert error <= FP16_TOL * max(1.0, np.abs(expected).max()), f"{component}.{name}: {error:.3g}"


@pytest.mark.gpu
def test_ort_cuda_keeps_no_dynamic_twin(ort_cuda: None, fused_export: Path) -> None:  # noqa: F811
    """With CUDA graphs, each shape runs on its own pinned session and the dynamic one is closed."""
    from test_gpu import _cast, _feeds

    from sdtrt.engine.ort_cuda import OrtCudaSession

    manifest = read_manifest(fused_export)
    session = OrtCudaSession(fused_export / manifest.component_file("unet", "fp16", fused=True).path)
    rng = np.random.default_rng(4)
    for side in (16, 16, 24, 24):
        session.run(_cast(session, _feeds(manifest, "unet", rng, side=side)))
        assert session.cuda_graph and session._session is None
    assert sorted(session.graph_ids.values()) == [1, 2]
    assert len({id(binding.session) for binding in session._bindings.values()}) == 2
    session.close()


@pytest.mark.gpu
def test_controlnet_on_the_fused_fp16_graphs_on_cuda(ort_cuda: None, fused_controlnet_export: Path) -> None:  # noqa: F811
    """ORT CUDA runs the fused fp16 UNet-with-residuals and ControlNet as ORT CPU runs the fused fp32 ones."""
    from test_gpu import FP16_TOL

    options = {"num_inference_steps": 4, "seed": 7, "guidance_scale": 7.5, "controlnet": "edges"}
    with (
        Pipeline.load(fused_controlnet_export, backend="ort-cpu") as on_cpu,
        Pipeline.load(fused_controlnet_export, backend="ort-cuda") as on_cuda,
    ):
        want = on_cpu.txt2img(PROMPT, control_image=control_image(0), **options)
        got = on_cuda.txt2img(PROMPT, control_image=control_image(0), **options)
        assert on_cuda.artifact.fused("unet_controlnet") and on_cuda.artifact.fused("controlnet.edges")
    error = np.abs(got.latents - want.latents).max()
    assert error <= 5 * FP16_TOL * max(1.0, float(np.abs(want.latents).max())), f"latents: {error:.3g}"


def test_info_lists_and_verify_hashes_the_fused_graphs(
    fused_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from sdtrt.cli import main
    from sdtrt.engine.verify import verify_export

    assert main(["info", str(fused_export)]) == 0
    assert "fp16 ORT-fused: unet.ort.fp16.onnx" in capsys.readouterr().out
    plain = verify_export(fused_export)
    assert not plain.problems
    copy = shutil.copytree(fused_export, tmp_path / "copy")
    fused = copy / "unet.ort.onnx"
    data = bytearray(fused.read_bytes())
    data[-1] ^= 1  # same size, another digest
    fused.write_bytes(bytes(data))
    assert any("unet.ort.onnx" in problem for problem in verify_export(copy).problems)
