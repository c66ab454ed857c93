"""`sdtrt serve`'s bad inputs: every route's body fuzzed field by field, a wrong method, text that is not text,
a client that leaves mid-request. Each answer is a 4xx with one JSON error line (never a 500), and the server
stays alive and answers the next request. One server, the shipped demo model, on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from benchmarks.serving import ServerProcess  # noqa: E402
from sdtrt.serve.a1111 import A1111Body, A1111Img2ImgBody, ControlNetUnit  # noqa: E402
from sdtrt.serve.openai import ImagesGenerationsBody  # noqa: E402
from sdtrt.serve.schemas import task_bodies  # noqa: E402


def _b64_image(side: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _b64_image()
SMALL = {"height": 64, "width": 64}
# a valid body of each route (one step: a fuzzed value that is valid draws quickly) and the fields to fuzz in it
NATIVE = {
    "txt2img": {"prompt": "x", "num_inference_steps": 1, **SMALL},
    "img2img": {"prompt": "x", "num_inference_steps": 1, "image": IMAGE},
    "inpaint": {"prompt": "x", "num_inference_steps": 1, "image": IMAGE, "mask": IMAGE},
    "outpaint": {"prompt": "x", "num_inference_steps": 1, "image": IMAGE, "left": 8},
    "upscale": {"prompt": "x", "num_inference_steps": 1, "image": IMAGE},
}
UNIT = {"image": IMAGE, "model": "map", "module": "canny"}
BODIES = task_bodies()
ROUTES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("/v1/txt2img", NATIVE["txt2img"], list(BODIES["txt2img"].model_fields)),
    *(
        (
            f"/v1/{task}",
            NATIVE[task],
            [*sorted(set(BODIES[task].model_fields) - set(BODIES["txt2img"].model_fields)), "prompt"],
        )
        for task in NATIVE
        if task != "txt2img"
    ),
    ("/v1/images/generations", {"prompt": "x", "steps": 1, "size": "64x64"}, list(ImagesGenerationsBody.model_fields)),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, **SMALL}, list(A1111Body.model_fields)),
    (
        "/sdapi/v1/img2img",
        {"prompt": "x", "steps": 1, "init_images": [IMAGE]},
        sorted(set(A1111Img2ImgBody.model_fields) - set(A1111Body.model_fields)),
    ),
]
WRONG = ["text", [], {}, {"nested": [1, {"deeper": None}]}, math.inf, -math.inf, 10**40, -1, 0.5, True, None]


def _cases() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(route, what was changed, the body) for each field of each route and each wrong value."""
    for route, body, fields in ROUTES:
        for field in fields:
            for value in WRONG:
                yield route, f"{field}={value!r}", {**body, field: value}
    a1111 = {"prompt": "x", "steps": 1, **SMALL}
    for value in WRONG:
        settings = {"sd_model_checkpoint": value}
        yield "/sdapi/v1/txt2img", f"sd_model_checkpoint={value!r}", {**a1111, "override_settings": settings}
        yield "/sdapi/v1/txt2img", f"override_settings={value!r}", {**a1111, "override_settings": value}
        yield "/sdapi/v1/txt2img", f"alwayson_scripts={value!r}", {**a1111, "alwayson_scripts": value}
        scripts = {"controlnet": {"args": value}}
        yield "/sdapi/v1/txt2img", f"controlnet.args={value!r}", {**a1111, "alwayson_scripts": scripts}
        for field in ControlNetUnit.model_fields:
            scripts = {"controlnet": {"args": [{**UNIT, field: value}]}}
            yield "/sdapi/v1/txt2img", f"controlnet unit {field}={value!r}", {**a1111, "alwayson_scripts": scripts}


def _json(body: dict[str, Any]) -> bytes:
    """The body as a client might send it: infinities as 1e999 (JSON has no other way to write them)."""
    return json.dumps(body).replace("-Infinity", "-1e999").replace("Infinity", "1e999").encode()


@pytest.fixture(scope="module")
def server(demo_export: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess([str(demo_export), "--backend", "ort-cpu", "--max-batch", "1"])
    yield proc
    proc.close()


def _one_json_error(answer: httpx.Response, what: str) -> dict[str, Any]:
    assert 400 <= answer.status_code < 500, f"{what}: {answer.status_code} {answer.text[:300]}"
    error = answer.json()["error"]
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in answer.text, what
    return error


def _alive(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.log.getvalue()[-3000:]
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_every_field_of_every_route_fuzzed_is_never_a_500(server: ServerProcess) -> None:
    failures = []
    with httpx.Client(base_url=server.url, timeout=60, headers={"content-type": "application/json"}) as client:
        for route, what, body in _cases():
            answer = client.post(route, content=_json(body))
            if answer.status_code >= 500:
                failures.append(f"{route} {what}: {answer.status_code} {answer.text[:200]}")
            elif answer.status_code >= 400:
                _one_json_error(answer, f"{route} {what}")
    assert not failures, "\n".join(failures)
    assert "Traceback" not in server.log.getvalue()
    _alive(server)


# route, the raw body, the status, words of the one error line
RAW_CASES = [
    (
        "a lone surrogate in the prompt",
        "/v1/txt2img",
        b'{"prompt": "a \\ud800 cat", "num_inference_steps": 1}',
        400,
        "prompt",
    ),
    ("a lone surrogate, OpenAI", "/v1/images/generations", b'{"prompt": "\\udfff"}', 400, "prompt"),
    ("a lone surrogate, Automatic1111", "/sdapi/v1/txt2img", b'{"prompt": "\\ud83d", "steps": 1}', 400, "prompt"),
    ("invalid UTF-8 in the body", "/v1/txt2img", b'{"prompt": "a \xff\xfe cat"}', 400, "parsing the body"),
    ("nesting deeper than any body", "/v1/txt2img", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ""),
]


@pytest.mark.parametrize(("name", "route", "raw", "status", "words"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_text_that_is_not_text_is_one_json_error(
    server: ServerProcess, name: str, route: str, raw: bytes, status: int, words: str
) -> None:
    answer = httpx.post(f"{server.url}{route}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text[:300]}"
    assert words in _one_json_error(answer, name)["message"]
    _alive(server)


@pytest.mark.parametrize(("method", "path", "allowed"), [("GET", "/v1/txt2img", "POST"), ("POST", "/healthz", "GET")])
def test_a_wrong_method_is_405_with_allow(server: ServerProcess, method: str, path: str, allowed: str) -> None:
    answer = httpx.request(method, f"{server.url}{path}", timeout=30)
    assert answer.status_code == 405 and answer.headers["allow"] == allowed, answer.text
    assert _one_json_error(answer, f"{method} {path}")["type"] == "method_not_allowed"
    _alive(server)


# the progress routes' queries: the route, the status, words of the one error line
QUERY_CASES = [
    ("an unknown request id", "/v1/progress?id=nobody", 404, "no request with id 'nobody' is running or waiting"),
    ("a request id of 5000 characters", "/v1/progress?id=" + "x" * 5000, 404, f"id '{'x' * 64}' is"),
    ("skip_preview that is no boolean", "/v1/progress?skip_preview=maybe", 400, "skip_preview"),
    ("skip_current_image that is no boolean", "/sdapi/v1/progress?skip_current_image=2", 400, "skip_current_image"),
]


@pytest.mark.parametrize(("name", "route", "status", "words"), QUERY_CASES, ids=[c[0] for c in QUERY_CASES])
def test_a_progress_query_that_finds_nothing_or_is_wrong_is_one_json_error(
    server: ServerProcess, name: str, route: str, status: int, words: str
) -> None:
    answer = httpx.get(f"{server.url}{route}", timeout=30)
    assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text[:300]}"
    assert words in _one_json_error(answer, name)["message"]
    _alive(server)


LONG = json.dumps({"prompt": "x", "num_inference_steps": 150, "height": 128, "width": 128}).encode()


def _until_sampling(server: ServerProcess) -> None:
    """Return once a job has taken its first denoising step (polled; a 30 s bound)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/sdapi/v1/progress?skip_current_image=true", timeout=10).json()["state"]
        if state.get("sampling_step", 0) >= 1:
            return
        time.sleep(0.01)
    raise AssertionError("the long request never started its steps")


@pytest.mark.parametrize(("when", "sent"), [("mid-body", b'{"prompt": '), ("mid-generation", LONG)])
def test_a_client_that_leaves_mid_request_is_logged_as_a_cancellation(
    server: ServerProcess, when: str, sent: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        head = f"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(LONG)}"
        raw.sendall(head.encode() + b"\r\n\r\n" + sent)
        if when == "mid-generation":  # leave once its steps have begun (a quiet machine draws it in a second)
            _until_sampling(server)
        else:
            time.sleep(1.0)
    time.sleep(2.0)  # the job stops at its next step
    for _ in range(3):  # requests that allocate: the cycle collector frees what the abandoned request left
        httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "x", "num_inference_steps": 1, **SMALL}, timeout=60)
    _alive(server)
    log = server.log.getvalue()
    assert "Future exception was never retrieved" not in log and "ERROR" not in log, log[-3000:]
    if when == "mid-generation":
        assert "abandoned: cancelled" in log, log[-3000:]
