"""Export: each ONNX network against its torch module, the manifest, and failure without leftovers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import onnx_digest
from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.profiles import component_dims, dynamic_profile, input_shapes
from sdtrt.export import exporter, wrappers

# Tolerances, as max |onnx - torch| / max |torch|: fp32 is the same math in another order; fp16
# carries ~3 decimal digits through a few dozen layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@pytest.fixture(scope="module")
def torch_nets(tiny_model_dir: Path) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    return {
        "text_encoder": wrappers.TextEncoderNet(
            CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder"),
            wrappers.TextEncoderGeometry("text_encoder", hidden_size=32, hidden_layer="last", vocab_size=49408),
        ),
        "unet": wrappers.UNetNet(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")),
        "vae_decoder": wrappers.VaeDecoderNet(vae),
        "vae_encoder": wrappers.VaeEncoderNet(vae),
    }


def _inputs(component: str, dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, h, w = dims["batch"], dims["h"], dims["w"]
    if component == "text_encoder":
        ids = rng.integers(0, 49406, size=(b, 77)).astype(np.int32)
        ids[:, 0], ids[:, 20:] = 49406, 49407  # bos, a few words, then eos padding
        return {"input_ids": ids}
    if component == "unet":
        return {
            "sample": rng.standard_normal((b, 4, h, w), dtype=np.float32),
            "timestep": np.full(b, 437.5, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((b, 77, 32), dtype=np.float32),
        }
    if component == "vae_decoder":
        return {"latent": rng.standard_normal((b, 4, h, w), dtype=np.float32)}
    return {"image": rng.uniform(-1, 1, (b, 3, 8 * h, 8 * w)).astype(np.float32)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_onnx_matches_torch(tiny_export: Path, torch_nets: dict, component: str, precision: str) -> None:
    manifest = load_manifest(tiny_export)
    file = manifest.component_file(component, precision)
    session = ort.InferenceSession(str(tiny_export / file.path), providers=["CPUExecutionProvider"])
    dtypes = {spec.name: spec.dtype for spec in file.inputs}
    rng = np.random.default_rng(1)
    for dims in ({"batch": 2, "h": 32, "w": 32}, {"batch": 3, "h": 16, "w": 48}):  # opt shape, and another
        feeds = _inputs(component, dims, rng)
        with torch.no_grad():
            expected = torch_nets[component](*(torch.from_numpy(a) for a in feeds.values())).numpy()
        (got,) = session.run(None, {k: a.astype(dtypes[k]) for k, a in feeds.items()})
        assert got.dtype == np.dtype(file.outputs[0].dtype)
        assert got.shape == expected.shape
        error = np.abs(got.astype(np.float32) - expected).max() / np.abs(expected).max()
        assert error < TOLERANCE[precision], f"{component} {precision} {dims}: relative error {error:.2e}"


def test_manifest_describes_the_export(tiny_export: Path, tiny_model_dir: Path) -> None:
    manifest = load_manifest(tiny_export)
    assert manifest.family == "sd1"
    assert manifest.prediction_type == "epsilon"
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)
    assert (manifest.vae_scale_factor, manifest.size_multiple) == (8, 16)
    assert (manifest.default_height, manifest.default_width) == (256, 256)
    assert manifest.scheduler["_class_name"] == "PNDMScheduler"
    assert manifest.source["sha256"] == exporter.source_hash(tiny_model_dir)
    assert sorted(manifest.components) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert manifest.tokenizers == {"text_encoder": "tokenizer"}
    written = json.loads((tiny_export / "manifest.json").read_text(encoding="utf-8"))
    assert all("profile" not in c for c in written["components"].values())  # the engine's profiles are the only ones
    profile = dynamic_profile(manifest)
    for name, component in manifest.components.items():
        for precision, file in component.files.items():
            path = tiny_export / file.path
            assert file.sha256 == onnx_digest(path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            ours = [(s.name, s.dtype, list(s.shape)) for s in file.inputs]
            theirs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
            assert [n for n, *_ in ours] == [n for n, *_ in theirs], name
            assert [s for *_, s in ours] == [s for *_, s in theirs], name
            assert [o.name for o in file.outputs] == [o.name for o in session.get_outputs()]
            assert precision in ("fp32", "fp16")
        lo, opt, hi = component_dims(manifest, name, profile)["batch"]
        assert 1 == lo <= opt <= hi
    unet = component_dims(manifest, "unet", profile)  # the engine's default profile of this model
    assert unet["latent_height"] == (16, 32, 64)
    assert input_shapes(manifest.component_file("unet", "fp32").inputs, unet)["sample"] == (
        (1, 4, 16, 16),
        (2, 4, 32, 32),
        (8, 4, 64, 64),
    )
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_export / "tokenizer").iterdir()}
    fp16_unet = {s.name: s.dtype for s in manifest.component_file("unet", "fp16").inputs}
    assert fp16_unet == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16"}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failed_export_leaves_nothing(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_on_second(module, spec, out_path, opset):
        calls.append(spec.name)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the middle of an export")
        out_path.write_bytes(b"partial")

    monkeypatch.setattr(exporter, "export_fp32", fail_on_second)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"^exporting unet failed: RuntimeError: simulated failure") as caught:
        exporter.export_model(tiny_model_dir, out, progress=False)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_a_failure_inside_torch_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_range(*args, **kwargs):
        raise IndexError("index out of range in self\n\nthe TorchScript frames that led here, many lines of them")

    monkeypatch.setattr(torch.onnx, "export", out_of_range)
    with pytest.raises(ExportError) as caught:
        exporter.export_model(tiny_model_dir, tmp_path / "out", components=("text_encoder",), progress=False)
    assert str(caught.value) == "exporting text_encoder failed: IndexError: index out of range in self"
    assert isinstance(caught.value.__cause__, IndexError)  # the whole story, for --debug
    assert list(tmp_path.iterdir()) == []


def test_trace_inputs_come_from_the_config() -> None:
    encoder = wrappers.TextEncoderGeometry("text_encoder", hidden_size=32, hidden_layer="last", vocab_size=64)
    geometry = wrappers.Geometry(77, (encoder,), 4, 4, 8, 128, unet_in_channels=7, unet_class_labels=5)
    generator = torch.Generator().manual_seed(0)
    (ids,) = wrappers.text_encoder_spec(geometry, encoder).example_inputs(generator)
    assert ids.shape == (2, 77) and 0 <= int(ids.min()) <= int(ids.max()) < 64
    noise_level = wrappers.unet_spec(geometry).example_inputs(generator)[-1]
    assert noise_level.dtype == torch.int32 and int(noise_level.max()) < 5


def test_export_refuses_existing_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    with pytest.raises(ExportError, match="already exists"):
        exporter.export_model(tiny_model_dir, tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_only_an_sdtrt_export_may_be_overwritten(tiny_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert exporter.export_refusal(folder) == "it is not empty and not an sdtrt export (no manifest.json)"
    (folder / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    assert exporter.export_refusal(folder) == "its manifest.json is not an sdtrt manifest"
    (folder / "manifest.json").write_text("{ not JSON")
    assert exporter.export_refusal(folder) == "its manifest.json is not an sdtrt manifest (JSONDecodeError)"
    (folder / "notes.txt").unlink()
    shutil.copy(tiny_export / "manifest.json", folder / "manifest.json")
    for name in ("unet.onnx", "unet.onnx.data", "unet.weights.json", "unet.fp16.onnx", "tokenizer", "trt", "openvino"):
        (folder / name).mkdir()  # what an export writes, and the engines' caches beside it
    assert exporter.export_refusal(folder) is None
    for name in ("notes.txt", "photos", "b", "c"):
        (folder / name).touch()
    assert exporter.export_refusal(folder) == (
        "it is an sdtrt export but also holds files sdtrt did not write (b, c, notes.txt and 1 more); "
        "move them out first"
    )


def test_export_refuses_what_it_cannot_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no model folder"):
        exporter.export_model(tmp_path / "nothing-here", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a diffusers model folder"):
        exporter.export_model(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(ExportError, match="unknown precision"):
        exporter.export_model(tiny_model_dir, tmp_path / "out", precisions=("int4",), progress=False)

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ExportError, match="FluxPipeline models are not supported"):
        exporter.export_model(other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hub_id_without_network_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="could not fetch 'no-such-org/no-such-model'"):
        exporter.export_model("no-such-org/no-such-model", tmp_path / "out", progress=False)


@pytest.mark.parametrize("opset", [3, 12, 25])
def test_export_refuses_an_unsupported_opset(tiny_model_dir: Path, tmp_path: Path, opset: int) -> None:
    with pytest.raises(ExportError, match=f"opset {opset} is not supported"):
        exporter.export_model(tiny_model_dir, tmp_path / "out", opset=opset, progress=False)
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite_a_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("not an export")
    with pytest.raises(ExportError, match="is not a folder"):
        exporter.export_model(tiny_model_dir, target, overwrite=True, progress=False)
    assert target.read_text() == "not an export"
    assert _leftovers(tmp_path) == []


def test_the_vae_is_loaded_once(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    loads = []
    original = diffusers.AutoencoderKL.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", counting)
    out = tmp_path / "out"
    exporter.export_model(tiny_model_dir, out, components=("vae_decoder", "vae_encoder"), progress=False)
    assert len(loads) == 1
    assert set(load_manifest(out).components) == {"vae_decoder", "vae_encoder"}


def test_the_libraries_chatter_is_shown_after_success_and_held_back_on_failure(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from sdtrt.export.chatter import held_back

    shown: list[str] = []  # what diffusers' loggers hand to their handlers (its own writes to stderr)

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    seen = Seen()
    logging.getLogger("diffusers").addHandler(seen)
    try:
        with held_back():
            logging.getLogger("diffusers.models.modeling_utils").warning("some weights were not used")
            warnings.warn("an odd option", UserWarning, stacklevel=1)
            assert shown == []  # held back during the work
    finally:
        logging.getLogger("diffusers").removeHandler(seen)
    assert shown == ["some weights were not used"]  # replayed to diffusers' own handlers after it
    caplog.set_level(logging.DEBUG, logger="sdtrt.export.chatter")
    with pytest.raises(ValueError), held_back():
        logging.getLogger("transformers.modeling_utils").warning("pages of warnings")
        warnings.warn("another odd option", UserWarning, stacklevel=1)
        raise ValueError("not a ControlNet")
    assert "pages of warnings" not in capsys.readouterr().err
    assert "held back from transformers.modeling_utils: pages of warnings" in caplog.text  # sdtrt -v shows it
    assert "held back: UserWarning: another odd option" in caplog.text
