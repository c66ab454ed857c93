"""`sdtrt serve` with a ControlNet attached: the native API's ControlNet options give the Python API's pixels,
and a wrong control image count is one JSON error."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image, ImageDraw  # noqa: E402
from test_serve import STEPS, b64, png  # noqa: E402

from benchmarks.serving import ServerProcess  # noqa: E402
from sdtrt.demo import demo_model_dir  # noqa: E402
from sdtrt.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def controlnet_export(demo_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo export with a ControlNet "map" made from its UNet, its zero convolutions seeded so that
    its residuals are not zero."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdtrt.export.controlnet import attach_controlnet

    root = tmp_path_factory.mktemp("serve-controlnet")
    folder = Path(shutil.copytree(demo_export, root / "tiny-sd"))
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(demo_model_dir() / "unet"))
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "controlnet_" in name and "cond_embedding" not in name:  # the zero convolutions
                parameter.normal_(0, 0.05)
    controlnet.save_pretrained(root / "controlnet")
    attach_controlnet(folder, root / "controlnet", name="map")
    return folder


@pytest.fixture(scope="module")
def controlnet_server(controlnet_export: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess([str(controlnet_export), "--backend", "ort-cpu"])
    yield proc
    proc.close()


def _map() -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse((8, 8, 32, 32), fill="white")
    return image


def test_controlnet_options_over_http_match_the_python_api(
    controlnet_export: Path, controlnet_server: ServerProcess
) -> None:
    options = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "seed": 3, "controlnet_conditioning_scale": 0.7}
    with Pipeline.load(controlnet_export, backend="ort-cpu") as pipe:
        expected = pipe.txt2img(PROMPT, controlnet="map", control_image=_map(), **options).images[0]
        plain = pipe.txt2img(PROMPT, **{k: v for k, v in options.items() if not k.startswith("controlnet")}).images[0]
    body = {"prompt": PROMPT, "controlnet": "map", "control_image": b64(_map()), **options}
    with httpx.Client(base_url=controlnet_server.url, timeout=120) as client:
        answer = client.post("/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(png(answer.json()["images"][0]), np.asarray(expected))
        assert not np.array_equal(np.asarray(expected), np.asarray(plain))  # the map changed the picture

        wrong = client.post("/v1/txt2img", json={**body, "control_image": [b64(_map()), b64(_map())]})
        assert wrong.status_code == 400
        assert "take 1 control image(s), got 2" in wrong.json()["error"]["message"]


def test_a1111_controlnet_units_match_the_python_api(controlnet_export: Path, controlnet_server: ServerProcess) -> None:
    """The sd-webui-controlnet extension's units (alwayson_scripts.controlnet.args) drive the attached ControlNets."""
    from sdtrt.runtime.control_images import canny

    edges = canny(_map(), 50, 150)
    with Pipeline.load(controlnet_export, backend="ort-cpu") as pipe:
        expected = pipe.txt2img(
            PROMPT,
            controlnet=["map", "map"],
            control_image=[_map(), edges],
            controlnet_conditioning_scale=[0.7, 0.3],
            control_guidance_end=[1.0, 0.5],
            guess_mode=True,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            seed=3,
        ).images[0]
    unit = {"model": "map [0a1b2c3d]", "control_mode": "ControlNet is more important"}
    units = [
        {**unit, "image": b64(_map()), "weight": 0.7, "module": "none"},
        {**unit, "enabled": False, "image": b64(_map()), "module": "depth_midas"},  # off: not read
        {
            **unit,
            "image": b64(_map()),
            "weight": 0.3,
            "guidance_end": 0.5,
            "module": "canny",
            "threshold_a": 50,
            "threshold_b": 150,
        },
    ]
    body = {
        "prompt": PROMPT,
        "steps": STEPS,
        "cfg_scale": 5.0,
        "seed": 3,
        "alwayson_scripts": {"controlnet": {"args": units}},
    }
    with httpx.Client(base_url=controlnet_server.url, timeout=120) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(png(answer.json()["images"][0]), np.asarray(expected))
        assert client.get("/controlnet/model_list").json() == {"model_list": ["map"]}
        assert client.get("/controlnet/module_list").json() == {"module_list": ["none", "canny"]}
        for bad, message in [
            ({"module": "openpose"}, "module 'openpose' is not run here (modules: none, canny)"),
            ({"control_mode": 1}, "control_mode 1 is not supported"),
            ({"model": "depth"}, "depth"),
        ]:
            args = [{**units[0], **bad}]
            wrong = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": args}}})
            assert wrong.status_code == 400 and message in wrong.json()["error"]["message"], wrong.text
