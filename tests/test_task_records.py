"""The task records (runtime/tasks) are the one source of every task's defaults: the Python methods, the CLI's
--help and the served HTTP schema agree on each; and a task registered in a test gets a Python method, a CLI
subcommand and an HTTP route with no other file changed."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.task_methods import shared_defaults, signature
from sdtrt.runtime.tasks import TASKS, Task, option, register, unregister
from sdtrt.runtime.tasks.txt2img import Txt2ImgOptions, txt2img

PROMPT = "a red circle"
FAST = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 3}
# the CLI's flag for each shared option, where its name differs
CLI_FLAGS = {
    "negative_prompt": "negative",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "vae": "tiny_vae",
}


def _help(argv: list[str]) -> str:
    from sdtrt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return " ".join(out.getvalue().split())  # argparse wraps lines: one line of words


def _cli_default(help_text: str, flag: str) -> str | None:
    """The "(default: X)" that --help gives for ``flag`` (None where the flag is not there)."""
    options = help_text.partition(" options: ")[2]  # past the usage line
    found = re.search(rf"{re.escape(flag)}(?: [A-Z_]+)? ((?:(?!--).)*?)\(default: ([^)]*)\)", options)
    return None if found is None else found[2]


def _same(value: Any, text: str | None) -> bool:
    """Whether a default and the text the CLI shows for it say the same."""
    if value is None:
        return text is not None  # a None default is described in words ("the model's native size")
    if isinstance(value, (bool, str)):
        return text == str(value)
    return text is not None and float(text) == float(value)


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The server's /openapi.json as a client fetches it (no model needs to load for it)."""
    from starlette.testclient import TestClient

    from sdtrt.serve.app import create_app
    from sdtrt.serve.config import ServeConfig

    app = create_app(ServeConfig((tmp_path_factory.mktemp("models") / "any",)))
    answer = TestClient(app).get("/openapi.json")  # no lifespan: the workers never start
    assert answer.status_code == 200
    return answer.json()


@pytest.mark.parametrize("name", list(TASKS))
def test_every_default_is_the_same_in_python_the_cli_and_http(name: str, openapi: dict[str, Any]) -> None:
    task = TASKS[name]
    python = {p.name: p.default for p in signature(task).parameters.values() if p.default is not p.empty}
    help_text = _help([task.cli_name, "--help"])
    route = openapi["paths"][f"/v1/{name}"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = openapi["components"]["schemas"][route.rsplit("/", 1)[1]]["properties"]
    options = {**shared_defaults(task), **{a.name: a.default for a in task.arguments if not a.python_only}}
    checked = 0
    for option_name, default in options.items():
        if option_name in task.images:
            continue
        assert python[option_name] == default, option_name
        assert schema[option_name].get("default") == default, (option_name, schema[option_name])
        flag = "--" + CLI_FLAGS.get(option_name, option_name).replace("_", "-")
        if isinstance(default, bool) and default:  # a flag that turns it off
            flag = "--no-" + flag[2:]
        assert _same(default, _cli_default(help_text, flag)), (option_name, flag)
        checked += 1
    assert checked >= 7  # the shared options at least
    # each default is said once in --help
    assert help_text.count(f"(default: {task.steps})") == 1


# --------------------------------------------------------------------------------------------------
# A task of the test's own


@dataclass(frozen=True)
class ScaledOptions:
    gain: float = option(0.5, "multiply the picture's pixels by this", low=0.0, high=1.0)


def _scaled(gen: Generation, options: ScaledOptions) -> GenerationResult:
    result = txt2img(gen, Txt2ImgOptions())
    result.images = [Image.fromarray((np.asarray(i) * options.gain).astype(np.uint8)) for i in result.images]
    return result


SCALED = Task(
    name="scaled",
    run=_scaled,
    options=ScaledOptions,
    summary="draw a prompt, darker",
    doc="txt2img, its pixels scaled by ``gain``.",
    steps=2,
    guidance=3.0,
)


@pytest.fixture
def scaled_task() -> Iterator[Task]:
    register(SCALED)
    try:
        yield SCALED
    finally:
        unregister(SCALED.name)


def test_a_registered_task_gets_a_method_a_command_and_a_route(
    scaled_task: Task, tiny_export: Path, tmp_path: Path
) -> None:
    from starlette.testclient import TestClient

    from sdtrt.cli import main
    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.serve.app import create_app
    from sdtrt.serve.config import ServeConfig

    with Pipeline.load(tiny_export, backend="ort-cpu") as pipe:
        plain = pipe.txt2img(PROMPT, **FAST, guidance_scale=3.0)
        darker = pipe.scaled(PROMPT, **FAST, gain=0.5)  # steps 2 and guidance 3: the record's defaults
        assert darker.seed == plain.seed and np.array_equal(darker.latents, plain.latents)
        expected = (np.asarray(plain.images[0]) * 0.5).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(darker.images[0]), expected)
        with pytest.raises(ValueError, match=r"^gain must be a number from 0 to 1, got 2$"):
            pipe.scaled(PROMPT, **FAST, gain=2)

    out = tmp_path / "scaled.png"
    argv = ["scaled", str(tiny_export), PROMPT, "--gain", "0.5", "--height", "64", "--width", "64", "--seed", "3"]
    assert main([*argv, "-o", str(out), "--backend", "ort-cpu", "-q"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    assert "(default: 0.5)" in _help(["scaled", "--help"])

    app = create_app(ServeConfig((tiny_export,), backend="ort-cpu", warmup=False))
    with TestClient(app) as client:
        for _ in range(600):  # the worker loads the model in its thread
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        body = {"prompt": PROMPT, "gain": 0.5, "height": 64, "width": 64, "seed": 3}
        answer = client.post("/v1/scaled", json=body)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        np.testing.assert_array_equal(np.asarray(image), expected)
        refused = client.post("/v1/scaled", json={**body, "strength": 0.5})
        assert refused.status_code == 400
        assert "scaled has no option 'strength' (options: prompt," in refused.json()["error"]["message"]
