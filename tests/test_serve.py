"""`sdtrt serve`: real server processes on loopback, a real HTTP client, the shipped demo model.

Each API answers with PNGs identical to the Python API's for the same seed (dynamic batching included);
a bounded load test loses and duplicates nothing; a full queue answers 429 and recovers; a client that
goes away frees its slot; errors are one JSON line. Every request loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from benchmarks.serving import ServerProcess  # noqa: E402
from sdtrt.runtime.pipeline import Pipeline  # noqa: E402

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background", "a green triangle"]
STEPS = 4


@pytest.fixture(scope="module")
def demo_lora(demo_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random kohya-style LoRA named "style" on every attention projection of the demo model's UNet."""
    from safetensors.numpy import save_file

    weights = json.loads((demo_export / "unet.weights.json").read_text())["weights"].values()
    rng, tensors = np.random.default_rng(0), {}
    for weight in weights:
        module, shape = weight["param"].removesuffix(".weight"), weight["param_shape"]
        if ".attn" in module and len(shape) == 2:  # Linear (out, in)
            key = "lora_unet_" + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = rng.normal(0, 0.3, (4, shape[1])).astype(np.float32)
            tensors[f"{key}.lora_up.weight"] = rng.normal(0, 0.3, (shape[0], 4)).astype(np.float32)
            tensors[f"{key}.alpha"] = np.array(4.0, dtype=np.float32)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def pipe(demo_export: Path) -> Iterator[Pipeline]:
    """The Python API on the server's backend: the reference every answer is compared with."""
    with Pipeline.load(demo_export, backend="ort-cpu") as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def server(demo_export: Path, demo_lora: Path) -> Iterator[ServerProcess]:
    """The main server: batching up to 4 images, an API key, a 256 KiB body limit, one LoRA adapter."""
    args = [str(demo_export), "--backend", "ort-cpu", "--max-batch", "4", "--queue-size", "64", "--max-body-mb", "0.25"]
    args += ["--lora", f"tiny-sd={demo_lora}"]
    proc = ServerProcess(args, env={"SDTRT_API_KEY": API_KEY})
    yield proc
    proc.close()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def png(data: str | bytes) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def same(answer: list[str], expected: list[Image.Image]) -> None:
    assert len(answer) == len(expected)
    for got, want in zip(answer, expected, strict=True):
        np.testing.assert_array_equal(png(got), np.asarray(want))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -- the APIs answer what the Python API draws ------------------------------------------------------


def test_native_txt2img_json_and_png_match_the_python_api(
    client: httpx.Client, pipe: Pipeline, server: ServerProcess
) -> None:
    options = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "seed": 7, "negative_prompt": "green"}
    expected = pipe.txt2img(PROMPTS[0], num_images=2, scheduler="euler_a", **options)
    answer = client.post("/v1/txt2img", json={"prompt": PROMPTS[0], "num_images": 2, "scheduler": "euler_a", **options})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    same(body["images"], expected.images)
    assert body["seed"] == 7 and body["model"] == "tiny-sd" and body["scheduler"] == "euler_a"
    assert {"text_encoder", "unet", "vae_decode", "total"} <= set(body["timings"])
    assert answer.headers["x-request-id"] == body["request_id"]

    headers = {"Accept": "image/png", "X-Request-Id": "trace-me-42"}
    single = client.post("/v1/txt2img", json={"prompt": PROMPTS[0], **options}, headers=headers)
    assert single.headers["content-type"] == "image/png" and single.headers["x-seed"] == "7"
    assert single.headers["x-request-id"] == "trace-me-42"
    np.testing.assert_array_equal(png(single.content), np.asarray(pipe.txt2img(PROMPTS[0], **options).images[0]))
    logged = [line for line in server.log.getvalue().splitlines() if "[trace-me-42]" in line]
    assert any("POST /v1/txt2img 200" in line for line in logged), logged  # the server's log names the request


def test_image_tasks_match_the_python_api(client: httpx.Client, pipe: Pipeline) -> None:
    source = pipe.txt2img(PROMPTS[1], num_inference_steps=STEPS, seed=1).images[0]
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    common = {"prompt": PROMPTS[2], "num_inference_steps": STEPS, "seed": 3}
    cases = [
        ("img2img", {"image": b64(source), "strength": 0.6}, {"image": source, "strength": 0.6}),
        ("inpaint", {"image": b64(source), "mask": b64(mask)}, {"image": source, "mask": mask}),
        ("outpaint", {"image": b64(source), "right": 32}, {"image": source, "right": 32}),
    ]
    for task, fields, inputs in cases:
        answer = client.post(f"/v1/{task}", json={**common, **fields})
        assert answer.status_code == 200, (task, answer.text)
        expected = getattr(pipe, task)(common["prompt"], num_inference_steps=STEPS, seed=3, **inputs)
        same(answer.json()["images"], expected.images)

    a1111 = {"prompt": PROMPTS[2], "steps": STEPS, "seed": 3, "init_images": [b64(source)], "denoising_strength": 0.6}
    answer = client.post("/sdapi/v1/img2img", json=a1111)
    assert answer.status_code == 200, answer.text
    same(
        answer.json()["images"],
        pipe.img2img(PROMPTS[2], source, num_inference_steps=STEPS, seed=3, strength=0.6).images,
    )

    refused = client.post("/v1/upscale", json={**common, "image": b64(source)})  # the demo model is no upscaler
    assert refused.status_code == 400 and "upscaler" in refused.json()["error"]["message"]
    assert str(pipe.artifact.folder.parent) not in refused.text  # the server's paths stay on the server


def test_openai_and_automatic1111_txt2img_match_the_python_api(client: httpx.Client, pipe: Pipeline) -> None:
    answer = client.post("/v1/images/generations", json={"prompt": PROMPTS[0], "n": 2, "size": "64x64", "seed": 11})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    same([d["b64_json"] for d in body["data"]], pipe.txt2img(PROMPTS[0], num_images=2, seed=11).images)

    a1111 = {
        "prompt": PROMPTS[1],
        "negative_prompt": "red",
        "seed": 5,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
    }
    a1111 |= {"steps": STEPS, "cfg_scale": 6.0, "width": 64, "height": 64, "batch_size": 2, "restore_faces": False}
    answer = client.post("/sdapi/v1/txt2img", json=a1111)
    assert answer.status_code == 200, answer.text
    expected = pipe.txt2img(
        PROMPTS[1], negative_prompt="red", seed=5, scheduler="dpmpp_2m_karras", num_inference_steps=STEPS,
        guidance_scale=6.0, height=64, width=64, num_images=2,
    )  # fmt: skip
    same(answer.json()["images"], expected.images)
    assert '"seed": 5' in answer.json()["info"]


def test_lora_by_name_matches_the_python_api_and_is_off_unless_asked(
    client: httpx.Client, pipe: Pipeline, demo_lora: Path
) -> None:
    body = {"prompt": PROMPTS[0], "seed": 4, "num_inference_steps": STEPS}
    styled = client.post("/v1/txt2img", json={**body, "loras": {"style": 1.5}})
    plain = client.post("/v1/txt2img", json=body)
    assert styled.status_code == plain.status_code == 200, (styled.text, plain.text)
    options = {"seed": 4, "num_inference_steps": STEPS}
    name = pipe.load_lora(demo_lora, scale=1.5)
    try:
        expected = pipe.txt2img(PROMPTS[0], **options)
    finally:
        pipe.unload_lora(name)
    same(styled.json()["images"], expected.images)
    same(plain.json()["images"], pipe.txt2img(PROMPTS[0], **options).images)
    assert styled.json()["images"] != plain.json()["images"]


def test_lora_from_openai_extra_body_and_a1111_prompt_tags(
    client: httpx.Client, pipe: Pipeline, demo_lora: Path
) -> None:
    """The OpenAI route's ``loras`` (the client's extra_body) and A1111's ``<lora:NAME:WEIGHT>``, which leaves the
    text the encoder sees: both answer what the Python API draws with the adapter at that scale."""
    openai = {"prompt": PROMPTS[0], "n": 1, "size": "64x64", "seed": 12, "loras": {"style": 0.8}}
    a1111 = {"prompt": f"{PROMPTS[1]}, <lora:style:1.2> <lora:style:0.3>", "seed": 6, "steps": STEPS, "cfg_scale": 5.0}
    a1111 |= {"width": 64, "height": 64, "sampler_name": "Euler a"}
    answers = client.post("/v1/images/generations", json=openai), client.post("/sdapi/v1/txt2img", json=a1111)
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    name = pipe.load_lora(demo_lora, scale=0.8)
    try:
        expected_openai = pipe.txt2img(PROMPTS[0], seed=12, height=64, width=64).images
        pipe.set_lora_scale(name, 1.5)  # 1.2 + 0.3: the same name twice adds up
        options = {"seed": 6, "num_inference_steps": STEPS, "guidance_scale": 5.0, "height": 64, "width": 64}
        expected_a1111 = pipe.txt2img(f"{PROMPTS[1]},", scheduler="euler_a", **options).images
    finally:
        pipe.unload_lora(name)
    same([d["b64_json"] for d in answers[0].json()["data"]], expected_openai)
    same(answers[1].json()["images"], expected_a1111)
    refusals = {"x <lora:watercolor:1>": "named 'watercolor'", "x <lora:style:lots>": "<lora:NAME:WEIGHT>"}
    for prompt, words in refusals.items():
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": prompt})
        assert refused.status_code == 400 and words in refused.json()["error"]["message"], refused.text


def test_concurrent_compatible_requests_share_a_unet_batch_and_match_running_alone(
    server: ServerProcess, pipe: Pipeline
) -> None:
    """Different prompts, seeds, negative prompts and guidance scales, one size/steps/scheduler: one UNet batch."""
    requests = [
        {"prompt": PROMPTS[i % 3], "seed": 100 + i, "guidance_scale": 3.0 + i, "negative_prompt": ["", "blue"][i % 2]}
        for i in range(4)
    ]
    before = _big_unet_calls(server)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            busy = {"prompt": "keeps the worker busy", "num_inference_steps": 150, "height": 128, "width": 128}
            first = asyncio.ensure_future(c.post("/v1/txt2img", json=busy))
            for _ in range(3000):  # once it runs its steps, the four below queue up behind it and then run together
                state = (await c.get("/sdapi/v1/progress?skip_current_image=true")).json()["state"]
                if state.get("sampling_step", 0) >= 1:
                    break
                await asyncio.sleep(0.01)
            answers = await asyncio.gather(
                *(c.post("/v1/txt2img", json={**r, "num_inference_steps": 8}) for r in requests)
            )
            await first
            return answers

    answers = asyncio.run(all_at_once())
    for request, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        options = {k: v for k, v in request.items() if k != "prompt"}
        same(answer.json()["images"], pipe.txt2img(request["prompt"], num_inference_steps=8, **options).images)
    assert _big_unet_calls(server) - before == 8  # 8 steps of one UNet call for 4 requests x 2 (guidance) samples


def _metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).text


def _big_unet_calls(server: ServerProcess) -> float:
    """UNet calls of 5 to 8 samples so far, from the batch-size histogram's cumulative buckets."""
    text = _metrics(server)
    buckets = dict(re.findall(r'sdtrt_unet_batch_size_bucket\{le="([\d.]+)",model="tiny-sd"\} (\S+)', text))
    return float(buckets.get("8.0", 0)) - float(buckets.get("4.0", 0))


# -- load, limits, errors ---------------------------------------------------------------------------


def test_load_200_requests_from_16_clients(
    server: ServerProcess, record_property: Callable[[str, object], None]
) -> None:
    """No errors, none lost or duplicated: each seed asked for comes back once, in its own answer."""
    count, concurrency = 200, 16
    latencies: list[float] = []

    async def one(c: httpx.AsyncClient, slots: asyncio.Semaphore, seed: int) -> tuple[int, str, int]:
        async with slots:
            t0 = time.perf_counter()
            r = await c.post("/v1/txt2img", json={"prompt": PROMPTS[seed % 3], "seed": seed, "num_inference_steps": 2})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            body = r.json()
            png(body["images"][0])
            return body["seed"], body["request_id"], len(body["images"])

    async def run() -> list[tuple[int, str, int]]:
        slots = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, slots, seed) for seed in range(count)))

    t0 = time.perf_counter()
    answers = asyncio.run(asyncio.wait_for(run(), timeout=240))
    elapsed = time.perf_counter() - t0
    assert sorted(seed for seed, _, _ in answers) == list(range(count))
    assert len({rid for _, rid, _ in answers}) == count and all(n == 1 for _, _, n in answers)
    p50, p99 = np.percentile(latencies, [50, 99])
    record_property(
        "load",
        f"{count} requests, {concurrency} clients: p50 {p50:.3f} s, p99 {p99:.3f} s, {count / elapsed:.1f} images/s",
    )
    print(f"\nload: {count} requests from {concurrency} clients in {elapsed:.1f} s: p50 {p50:.3f} s, p99 {p99:.3f} s")
    metrics = _metrics(server)
    assert re.search(r'sdtrt_images_total\{model="tiny-sd"\} (\d+)', metrics)
    assert 'sdtrt_request_seconds_count{route="/v1/txt2img",status="200"}' in metrics
    assert 'sdtrt_stage_seconds_count{model="tiny-sd",stage="unet"}' in metrics
    assert re.search(r'sdtrt_in_flight\{model="tiny-sd"\} 0\.0', metrics)


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        ({"prompt": "x", "num_inference_steps": 151}, 400, "invalid_input", "above this server's limit of 150"),
        ({"prompt": "x", "height": 4096}, 400, "invalid_input", "above the ceiling of 128"),
        ({"prompt": "x", "num_images": 9}, 400, "invalid_input", "above the ceiling of 8"),
        ({"prompt": "x" * 2001}, 400, "invalid_input", "2001 characters"),
        ({"prompt": "x", "steps": 5}, 400, "invalid_input", "txt2img has no option 'steps' (options: prompt,"),
        ({"prompt": "x", "seed": True}, 400, "invalid_input", "seed"),
        ({"prompt": "x", "model": "/etc/passwd"}, 404, "not_found", "no model named '/etc/passwd'"),
        ({"prompt": "x", "loras": {"watercolor": 1.0}}, 400, "invalid_input", "named 'watercolor' (configured: style)"),
        ({"prompt": "x", "scheduler": "magic"}, 400, "invalid_input", "unknown scheduler 'magic'"),
        ({"prompt": "x", "image": "not base64!"}, 400, "invalid_input", "txt2img has no option 'image'"),
        ({"prompt": "x" * 300_000}, 413, "too_large", "above this server's limit of 262144 bytes"),
    ],
)
def test_bad_requests_are_one_json_error(client: httpx.Client, body: dict, status: int, kind: str, words: str) -> None:
    answer = client.post("/v1/txt2img", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == kind and words in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in answer.text
    assert error["request_id"] == answer.headers["x-request-id"]


def test_api_key_and_open_probes(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").json() == {"ready": True, "models": {"tiny-sd": "ready"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        answer = httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "x"}, headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "unauthorized"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    not_json = httpx.post(
        f"{server.url}/v1/txt2img", content=b"{", headers={**AUTH, "content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]


def test_automatic1111_progress_shows_step_eta_and_a_preview(client: httpx.Client) -> None:
    done = threading.Event()

    def long_request() -> None:
        with httpx.Client(base_url=client.base_url, headers=AUTH, timeout=60) as c:
            c.post("/sdapi/v1/txt2img", json={"prompt": PROMPTS[0], "steps": 150, "width": 128, "height": 128})
        done.set()

    threading.Thread(target=long_request, daemon=True).start()
    seen = None
    deadline = time.monotonic() + 30
    while not done.is_set() and time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"].get("sampling_step", 0) > 5 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.1)
    assert seen is not None, "no progress seen while the request ran"
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0 and seen["state"]["sampling_steps"] == 150
    assert png(seen["current_image"]).shape == (16, 16, 3)  # the latents' size: one pixel per latent pixel
    done.wait(60)


# -- a small queue: 429 when full, recovery, cancellation, deadlines ---------------------------------


@pytest.fixture(scope="module")
def small_server(demo_export: Path) -> Iterator[ServerProcess]:
    """One request at a time (no batching), two may wait, a 5 s deadline."""
    args = [str(demo_export), "--backend", "ort-cpu", "--max-batch", "1", "--queue-size", "2"]
    proc = ServerProcess([*args, "--deadline", "5", "--max-steps", "1000"])
    yield proc
    proc.close()


def _send_raw(server: ServerProcess, body: str) -> socket.socket:
    """A request on a socket of its own, left unread: closing the socket is a client going away."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall((head + body).encode())
    return sock


def _number(server: ServerProcess, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", _metrics(server), re.MULTILINE)
    return float(found[1]) if found else 0.0


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# a minute or more of work on any CPU: 4 images at twice the native side, 1000 steps; stopped long before
LONG = {"prompt": "a long one", "num_inference_steps": 1000, "height": 128, "width": 128, "num_images": 4}
IN_FLIGHT, QUEUED = 'sdtrt_in_flight{model="tiny-sd"}', 'sdtrt_queue_depth{model="tiny-sd"}'
CANCELLED, DEADLINE = 'sdtrt_errors_total{kind="cancelled"}', 'sdtrt_errors_total{kind="deadline"}'


def test_full_queue_answers_429_and_recovers_and_cancelled_requests_free_their_slots(
    small_server: ServerProcess,
) -> None:
    long = json.dumps(LONG)
    running = _send_raw(small_server, long)
    _wait_for(lambda: _number(small_server, IN_FLIGHT) == 1, timeout=5)
    waiting = [_send_raw(small_server, long) for _ in range(2)]
    _wait_for(lambda: _number(small_server, QUEUED) == 2, timeout=5)

    full = httpx.post(f"{small_server.url}/v1/txt2img", json={"prompt": "x", "num_inference_steps": 2}, timeout=10)
    assert full.status_code == 429 and full.json()["error"]["type"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1

    for sock in waiting:  # clients that go away while queued: their slots are free at once
        sock.close()
    _wait_for(lambda: _number(small_server, QUEUED) == 0, timeout=2)
    running.close()  # the running request stops at its next step
    _wait_for(lambda: _number(small_server, IN_FLIGHT) == 0, timeout=2)
    assert _number(small_server, CANCELLED) == 3 and _number(small_server, DEADLINE) == 0

    after = httpx.post(f"{small_server.url}/v1/txt2img", json={"prompt": "x", "num_inference_steps": 2}, timeout=30)
    assert after.status_code == 200, after.text


def test_a_request_past_its_deadline_ends_with_504(small_server: ServerProcess) -> None:
    t0 = time.monotonic()
    answer = httpx.post(f"{small_server.url}/v1/txt2img", json=LONG, timeout=30)
    assert answer.status_code == 504 and answer.json()["error"]["type"] == "deadline"
    assert 4.5 < time.monotonic() - t0 < 15
    _wait_for(lambda: _number(small_server, IN_FLIGHT) == 0, timeout=5)


def test_serve_command_help_and_a_folder_that_is_no_export_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sdtrt.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in ("--port", "--max-batch", "--queue-size", "--deadline", "--max-steps", "--ray", "SDTRT_API_KEY"):
        assert option in text
    assert main(["serve", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sdtrt: error: ") and error.count("\n") == 1 and "missing" in error
