"""TensorRT profiles, plan keys, plan compatibility and profile checks: the pure logic, on the CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.manifest import MANIFEST_NAME, Component, ComponentFile, Manifest, read_manifest
from sdtrt.engine.profiles import (
    ProfileSpec,
    bound_dims,
    check_in_profile,
    component_dims,
    dynamic_profile,
    input_shapes,
    parse_profile,
    static_profile,
    suggest_profile,
)
from sdtrt.engine.session import TensorSpec
from sdtrt.engine.trt_plans import (
    PlanMeta,
    RuntimeInfo,
    plan_dir,
    plan_key,
    plan_problems,
    plan_warnings,
    read_candidates,
    select_plan,
)

LATENT = ("batch", 4, "latent_height", "latent_width")
H100 = RuntimeInfo("10.8.0.43", (9, 0), "NVIDIA H100 80GB HBM3")


def _component(inputs, outputs) -> Component:
    def at(spec: TensorSpec, precision: str) -> TensorSpec:
        half = precision == "fp16" and spec.dtype == "float32" and spec.name != "timestep"
        return TensorSpec(spec.name, "float16" if half else spec.dtype, spec.shape)

    files = {
        p: ComponentFile(f"x.{p}.onnx", f"sha-{p}", tuple(at(s, p) for s in inputs), tuple(at(s, p) for s in outputs))
        for p in ("fp32", "fp16")
    }
    return Component(files=files)


@pytest.fixture(scope="module")
def sd15() -> Manifest:
    """A manifest shaped like Stable Diffusion 1.5's export (512 px native, sizes in multiples of 64)."""
    components = {
        "text_encoder": _component(
            [TensorSpec("input_ids", "int32", ("batch", 77))],
            [TensorSpec("hidden_states", "float32", ("batch", 77, 768))],
        ),
        "unet": _component(
            [
                TensorSpec("sample", "float32", LATENT),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", 77, 768)),
            ],
            [TensorSpec("noise_pred", "float32", LATENT)],
        ),
        "vae_decoder": _component(
            [TensorSpec("latent", "float32", LATENT)],
            [TensorSpec("image", "float32", ("batch", 3, "height", "width"))],
        ),
        "vae_encoder": _component(
            [TensorSpec("image", "float32", ("batch", 3, "height", "width"))],
            [TensorSpec("latent_moments", "float32", ("batch", 8, "latent_height", "latent_width"))],
        ),
    }
    return Manifest(
        family="sd1",
        prediction_type="epsilon",
        vae_scaling_factor=0.18215,
        vae_scale_factor=8,
        size_multiple=64,
        latent_channels=4,
        default_height=512,
        default_width=512,
        text_max_length=77,
        scheduler={"_class_name": "PNDMScheduler"},
        components=components,
    )


def test_default_dynamic_profile(sd15: Manifest) -> None:
    spec = dynamic_profile(sd15)
    assert spec == ProfileSpec((256, 512, 1024), (256, 512, 1024), (1, 1, 4), cfg=True)
    assert not spec.static
    assert spec.describe() == "dynamic 256-1024 x 256-1024 px, batch 1-4"
    assert spec.command("artifacts/sd15") == "sdtrt build artifacts/sd15 --dynamic 256-1024 --batch 1-4"
    assert parse_profile(sd15) == spec
    # the UNet's batch doubles for CFG and keeps 1 for guidance <= 1; the text encoder sees prompts, then negatives
    assert component_dims(sd15, "unet", spec) == {
        "batch": (1, 2, 8),
        "latent_height": (32, 64, 128),
        "latent_width": (32, 64, 128),
    }
    assert component_dims(sd15, "text_encoder", spec) == {"batch": (1, 1, 8)}
    assert component_dims(sd15, "vae_decoder", spec) == {  # its inputs' dimensions, not its output's height
        "batch": (1, 1, 4),
        "latent_height": (32, 64, 128),
        "latent_width": (32, 64, 128),
    }
    assert component_dims(sd15, "vae_encoder", spec) == {
        "batch": (1, 1, 4),
        "height": (256, 512, 1024),
        "width": (256, 512, 1024),
    }


def test_static_profile_doubles_the_unet_batch_for_cfg(sd15: Manifest) -> None:
    spec = static_profile(sd15, (512, 768), batch=2)
    assert spec.static and spec.describe() == "static 512x768, batch 2"
    assert spec.command("d") == "sdtrt build d --static 512x768 --batch 2"
    unet = component_dims(sd15, "unet", spec)
    assert unet == {"batch": (4, 4, 4), "latent_height": (64, 64, 64), "latent_width": (96, 96, 96)}
    shapes = input_shapes(sd15.components["unet"].files["fp16"].inputs, unet)
    assert shapes["sample"] == ((4, 4, 64, 96),) * 3
    assert shapes["timestep"] == ((4,),) * 3
    assert shapes["encoder_hidden_states"] == ((4, 77, 768),) * 3
    assert component_dims(sd15, "text_encoder", spec) == {"batch": (1, 2, 4)}
    assert component_dims(sd15, "vae_decoder", spec)["batch"] == (2, 2, 2)

    plain = static_profile(sd15, (512, 512), batch=2, cfg=False)
    assert plain.describe() == "static 512x512, batch 2, no CFG"
    assert plain.command("d") == "sdtrt build d --static 512x512 --batch 2 --no-cfg"
    assert component_dims(sd15, "unet", plain)["batch"] == (2, 2, 2)
    assert component_dims(sd15, "text_encoder", plain) == {"batch": (1, 2, 2)}


def test_the_manifest_names_dimensions_and_holds_no_profile(sd15: Manifest, tmp_path: Path) -> None:
    saved = sd15.to_dict()
    assert all(set(c) == {"files"} for c in saved["components"].values())
    for component in saved["components"].values():  # an older export's profile is ignored
        component["profile"] = {"batch": [1, 2, 8]}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(saved), encoding="utf-8")
    assert read_manifest(tmp_path) == sd15  # the manifest alone: its files are test_engine's

    saved["components"]["refiner"] = saved["components"]["unet"]  # a network the table does not know
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ManifestError, match=r"unknown networks \['refiner'\]"):
        read_manifest(tmp_path)

    file = sd15.components["text_encoder"].files["fp32"]
    odd = dataclasses.replace(file, inputs=(TensorSpec("input_ids", "int32", ("batch", "tokens")),))
    manifest = dataclasses.replace(sd15, components={"text_encoder": Component(files={"fp32": odd})})
    with pytest.raises(ManifestError, match="text_encoder: unknown dynamic dimension 'tokens'"):
        component_dims(manifest, "text_encoder", dynamic_profile(sd15))


def test_parse_profile(sd15: Manifest) -> None:
    assert parse_profile(sd15, static="768") == static_profile(sd15, (768, 768), 1)
    assert parse_profile(sd15, static="512x768", batch="3", cfg=False) == static_profile(sd15, (512, 768), 3, False)
    spec = parse_profile(sd15, dynamic="640-1024", batch="2")
    assert spec == ProfileSpec((640, 640, 1024), (640, 640, 1024), (2, 2, 2))  # opt: native size clipped into range
    wide = parse_profile(sd15, dynamic="256x512-512x1024", batch="1-2")
    assert wide.height == (256, 512, 512) and wide.width == (512, 512, 1024)
    assert wide.command("d") == "sdtrt build d --dynamic 256x512-512x1024 --batch 1-2"
    errors = [
        ({"static": "512", "dynamic": "256-512"}, "not both"),
        ({"static": "512", "batch": "1-4"}, "one batch size"),
        ({"static": "500x512"}, "height 500 is not a multiple of 64"),
        ({"static": "512xabc"}, "not HEIGHTxWIDTH"),
        ({"dynamic": "1024-256"}, "min <= max"),
        ({"dynamic": "256-"}, "not MIN-MAX"),
        ({"batch": "0-2"}, "at least 1"),
        ({"batch": "two"}, "not a count"),
    ]
    for options, message in errors:
        with pytest.raises(InvalidInputError, match=message):
            parse_profile(sd15, **options)


def test_plan_key_and_folder() -> None:
    shapes = {"sample": ((2, 4, 64, 64),) * 3, "timestep": ((2,),) * 3}
    key = plan_key("abc", "fp16", shapes)
    assert len(key) == 16 and int(key, 16) >= 0
    assert plan_key("abc", "fp16", dict(reversed(shapes.items()))) == key  # order-free
    assert len({key, plan_key("abd", "fp16", shapes), plan_key("abc", "fp32", shapes)}) == 3
    assert plan_key("abc", "fp16", {**shapes, "timestep": ((1,), (2,), (2,))}) != key
    assert H100.folder_name == "sm90-trt10.8.0.43"
    assert plan_dir("artifacts/sd15", H100) == Path("artifacts/sd15/trt/sm90-trt10.8.0.43")


def _meta(**changes) -> PlanMeta:
    fields = {
        "component": "unet",
        "precision": "fp16",
        "onnx_sha256": "sha-fp16",
        "profile": ProfileSpec((512,) * 3, (512,) * 3, (1,) * 3),
        "shapes": {"sample": ((2, 4, 64, 64),) * 3},
        "trt_version": H100.trt_version,
        "compute_capability": H100.compute_capability,
        "gpu_name": H100.gpu_name,
        "plan_size": 1000,
        "created": "2026-01-01T00:00:00+00:00",
        **changes,
    }
    return PlanMeta(**fields)


def test_plan_meta_round_trip() -> None:
    meta = _meta()
    assert PlanMeta.from_dict(meta.to_dict()) == meta
    assert meta.key == plan_key("sha-fp16", "fp16", meta.shapes)
    assert meta.plan_name == f"unet.{meta.key}.plan" and meta.sidecar_name == f"unet.{meta.key}.json"


def test_plan_compatibility() -> None:
    assert plan_problems(_meta(), H100, 1000) == []
    assert plan_problems(_meta(trt_version="10.3.0.26"), H100, 1000) == [
        "built by TensorRT 10.3.0.26, this is TensorRT 10.8.0.43"
    ]
    assert plan_problems(_meta(compute_capability=(8, 9), gpu_name="NVIDIA L4"), H100, 1000) == [
        "built for NVIDIA L4 (sm89), this GPU is NVIDIA H100 80GB HBM3 (sm90)"
    ]
    assert plan_problems(_meta(), H100, None) == ["the plan file is missing"]
    assert plan_problems(_meta(), H100, 999) == ["the plan file has 999 bytes, its sidecar says 1000"]
    assert plan_problems(_meta(format=0), H100, 1000) == ["sidecar format 0, this sdtrt writes 1"]
    assert plan_warnings(_meta(), H100) == []
    assert plan_warnings(_meta(gpu_name="NVIDIA H100 PCIe"), H100) == [
        "built on NVIDIA H100 PCIe, running on NVIDIA H100 80GB HBM3: it loads, but may run slower"
    ]


def test_select_plan_takes_the_newest_loadable() -> None:
    old = _meta(created="2026-01-01T00:00:00+00:00")
    new = _meta(created="2026-02-01T00:00:00+00:00", shapes={"sample": ((2, 4, 96, 96),) * 3})
    candidates = {
        "a.json": (old, 1000),
        "b.json": (new, 1000),
        "c.json": (_meta(created="2026-03-01", trt_version="10.3.0.26"), 1000),
        "d.json": (_meta(created="2026-03-01", onnx_sha256="stale"), 1000),
        "e.json": (_meta(created="2026-03-01"), None),
        "f.json": (_meta(created="2026-03-01", component="vae_decoder"), 1000),
        "g.json": (_meta(created="2026-03-01", precision="fp32"), 1000),
    }
    chosen, passed_over = select_plan(candidates, "unet", "fp16", "sha-fp16", H100)
    assert chosen == new
    assert passed_over == [
        "c.json: built by TensorRT 10.3.0.26, this is TensorRT 10.8.0.43",
        "d.json: built from another export of unet (the ONNX file changed)",
        "e.json: the plan file is missing",
    ]
    assert select_plan({}, "unet", "fp16", "sha-fp16", H100) == (None, [])


def test_unreadable_sidecars_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _meta()
    (tmp_path / good.sidecar_name).write_text(json.dumps(good.to_dict()), encoding="utf-8")
    (tmp_path / good.plan_name).write_bytes(b"x" * 1000)
    broken = {
        "list-shapes.json": {**good.to_dict(), "shapes": [1, 2]},
        "string-profile.json": {**good.to_dict(), "profile": "static"},
        "list-profile.json": {**good.to_dict(), "profile": [512, 512]},
        "short.json": {"component": "unet"},
        "not-json.json": "{",
        "list.json": [],
    }
    for name, content in broken.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sdtrt.engine.trt_plans"):
        assert read_candidates(tmp_path) == {good.sidecar_name: (good, 1000)}
    warned = sorted(r.getMessage().split(": ")[0] for r in caplog.records)
    assert warned == sorted(f"ignoring unreadable plan sidecar {tmp_path / name}" for name in broken)


def test_request_outside_the_profile(sd15: Manifest) -> None:
    built = static_profile(sd15, (512, 512), batch=1)
    inputs = sd15.components["unet"].files["fp16"].inputs
    ranges = input_shapes(inputs, component_dims(sd15, "unet", built))
    specs = {s.name: s for s in inputs}

    def check(batch: int, side: int) -> None:
        shapes = {"sample": (batch, 4, side, side), "timestep": (batch,), "encoder_hidden_states": (batch, 77, 768)}
        hint = suggest_profile(sd15, "unet", bound_dims(specs, shapes), built).command("artifacts/sd15")
        check_in_profile("unet", shapes, ranges, built, lambda: hint)

    check(2, 64)  # one CFG pair at 512x512: inside
    with pytest.raises(InvalidInputError) as info:
        check(2, 96)
    assert str(info.value) == (
        "unet: input 'sample' has shape (2, 4, 96, 96), outside the TensorRT profile this engine was built for "
        "(static 512x512, batch 1: sample (2, 4, 64, 64)); "
        "build an engine for it with: sdtrt build artifacts/sd15 --static 768x768 --batch 1"
    )
    with pytest.raises(InvalidInputError, match=r"--static 512x512 --batch 1 --no-cfg$"):
        check(1, 64)  # guidance <= 1 runs the UNet on one half

    dynamic = dynamic_profile(sd15)
    ranges = input_shapes(inputs, component_dims(sd15, "unet", dynamic))
    with pytest.raises(InvalidInputError, match=r"sample \(1, 4, 32, 32\) to \(8, 4, 128, 128\)"):
        check_in_profile("unet", {"sample": (2, 4, 144, 144)}, ranges, dynamic, lambda: "")


def test_suggested_profiles(sd15: Manifest) -> None:
    built = dynamic_profile(sd15)
    assert suggest_profile(sd15, "text_encoder", {"batch": 5}, built) == static_profile(sd15, (512, 512), 3)
    dims = {"batch": 2, "latent_height": 96, "latent_width": 64}
    assert suggest_profile(sd15, "vae_decoder", dims, built) == static_profile(sd15, (768, 512), 2)
    dims = {"batch": 1, "height": 1280, "width": 1280}
    assert suggest_profile(sd15, "vae_encoder", dims, built) == static_profile(sd15, (1280, 1280), 1)


@pytest.fixture(scope="module")
def sdxl(sd15: Manifest) -> Manifest:
    """The SD 1.5-shaped manifest with SDXL's second, pooled text encoder, its tokenizer and 1024 px native size."""
    text_encoder_2 = _component(
        [TensorSpec("input_ids", "int32", ("batch", 77))],
        [
            TensorSpec("hidden_states", "float32", ("batch", 77, 1280)),
            TensorSpec("text_embeds", "float32", ("batch", 1280)),
        ],
    )
    return dataclasses.replace(
        sd15,
        family="sdxl",
        default_height=1024,
        default_width=1024,
        components={**sd15.components, "text_encoder_2": text_encoder_2},
        tokenizers={"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"},
    )


def test_static_batch_serves_every_text_encoder_and_one_source_image(sdxl: Manifest) -> None:
    # txt2img with num_images=2 encodes the one prompt with both text encoders (batch 1, then 1 negative);
    # img2img encodes its one source image: a static batch 2 must still take batch 1 there
    spec = static_profile(sdxl, (1024, 1024), batch=2)
    assert component_dims(sdxl, "unet", spec)["batch"] == (4, 4, 4)
    assert component_dims(sdxl, "text_encoder", spec) == {"batch": (1, 2, 4)}
    assert component_dims(sdxl, "text_encoder_2", spec) == {"batch": (1, 2, 4)}
    assert component_dims(sdxl, "vae_encoder", spec)["batch"] == (1, 1, 2)
    assert component_dims(sdxl, "vae_decoder", spec)["batch"] == (2, 2, 2)
    inputs = sdxl.components["text_encoder_2"].files["fp16"].inputs
    assert input_shapes(inputs, component_dims(sdxl, "text_encoder_2", spec)) == {
        "input_ids": ((1, 77), (2, 77), (4, 77))
    }
    inputs = sdxl.components["vae_encoder"].files["fp16"].inputs
    image = input_shapes(inputs, component_dims(sdxl, "vae_encoder", spec))["image"]
    assert image == ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (2, 3, 1024, 1024))

    plain = static_profile(sdxl, (1024, 1024), batch=2, cfg=False)
    assert component_dims(sdxl, "text_encoder_2", plain) == {"batch": (1, 2, 2)}
    # the hint for a second text encoder halves a CFG batch as for the first
    built = dynamic_profile(sdxl)
    assert suggest_profile(sdxl, "text_encoder_2", {"batch": 5}, built) == static_profile(sdxl, (1024, 1024), 3)
