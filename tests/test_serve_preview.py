"""Progress previews: a watched job's preview is the tiny VAE's decode of its latents where the export has one
(decoded in the worker's thread, only while a client watches), else the linear map's; the native progress route.

The servers are real `sdtrt serve` processes on loopback (ort-cpu), the model the tiny SD 1.x export with a
random-weight tiny VAE attached (tests/conftest.py); the reference is the Python API's own tiny decode.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

from benchmarks.serving import ServerProcess  # noqa: E402
from sdtrt.runtime.batching import BatchCall, run_batch  # noqa: E402
from sdtrt.runtime.image import to_pil  # noqa: E402
from sdtrt.runtime.pipeline import Pipeline  # noqa: E402
from sdtrt.runtime.request import Request  # noqa: E402
from sdtrt.runtime.vae import TINY_DECODER, decode_latents  # noqa: E402
from sdtrt.serve.preview import LINEAR, TINY, JobPreview, LatentPreview, Previewer  # noqa: E402

PROMPT = "a red circle on a blue background"
SIZE = {"height": 128, "width": 128}  # latents 16 x 16
LONG_STEPS = 400  # long enough to watch on the tiny model (a few ms per step)
PIXEL_TOLERANCE = 1  # levels of 255: the server's UNet runs on one thread, the reference on several
PIXELS_OFF_BY_ONE = 0.01
POLL_S = 0.05


@pytest.fixture(scope="module")
def tiny_vae_server(tiny_vae_export: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess([str(tiny_vae_export), "--backend", "ort-cpu", "--max-steps", str(LONG_STEPS)])
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def plain_server(tiny_export: Path) -> Iterator[ServerProcess]:
    """The same model without a tiny VAE."""
    proc = ServerProcess([str(tiny_export), "--backend", "ort-cpu", "--max-steps", str(LONG_STEPS)])
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def tiny_vae_pipe(tiny_vae_export: Path) -> Iterator[Pipeline]:
    with Pipeline.load(tiny_vae_export, backend="ort-cpu") as pipeline:
        yield pipeline


def _png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), np.int16)


def _tiny_decodes(url: str) -> float:
    """How many previews the server's tiny VAE has decoded (its sdtrt_preview_seconds histogram's count)."""
    found = re.search(r"^sdtrt_preview_seconds_count\{.*\} (\S+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(found[1]) if found else 0.0


class Generating:
    """A long txt2img request with the request id ``rid``, sent from a thread of its own; the answer in ``answer``."""

    def __init__(self, url: str, rid: str, seed: int, steps: int = LONG_STEPS) -> None:
        self.body = {"prompt": PROMPT, "seed": seed, "num_inference_steps": steps, "scheduler": "ddim", **SIZE}
        self.answer: httpx.Response | None = None
        headers = {"X-Request-Id": rid}
        self._thread = threading.Thread(
            target=lambda: setattr(
                self, "answer", httpx.post(f"{url}/v1/txt2img", json=self.body, headers=headers, timeout=120)
            ),
            daemon=True,
        )
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> httpx.Response:
        self._thread.join(120)
        assert self.answer is not None and self.answer.status_code == 200, self.answer and self.answer.text
        return self.answer


def _poll(url: str, rid: str, generating: Generating, accept, skip_preview: bool = False) -> dict:
    """The native route's entry for ``rid`` once ``accept(entry)``; fails if the request ends first."""
    deadline = time.monotonic() + 60
    while not generating.done() and time.monotonic() < deadline:
        answer = httpx.get(f"{url}/v1/progress", params={"id": rid, "skip_preview": skip_preview})
        if answer.status_code == 200:
            (entry,) = answer.json()["jobs"]
            if accept(entry):
                return entry
        time.sleep(POLL_S)
    raise AssertionError(f"request {rid} ended before the progress route showed what was awaited")


def _unet_input(pipe: Pipeline, body: dict, step: int) -> np.ndarray:
    """The UNet's sample input after ``step`` steps of the request ``body``, run by the Python API."""

    class Seen(Exception):
        pass

    seen: list[np.ndarray] = []

    def on_sample(sample: np.ndarray, runner: object) -> None:
        seen.append(sample)
        if len(seen) > step:
            raise Seen

    plan = pipe.plan("txt2img", Request(**body))
    (result,), _ = run_batch(pipe, [BatchCall(plan, on_sample=on_sample)])
    assert isinstance(result, Seen)
    return seen[step]


def test_a_watched_job_shows_the_tiny_vaes_decode_of_its_latents(
    tiny_vae_server: ServerProcess, tiny_vae_pipe: Pipeline
) -> None:
    url = tiny_vae_server.url
    before = _tiny_decodes(url)
    generating = Generating(url, "watched-1", seed=7)
    entry = _poll(url, "watched-1", generating, lambda e: e["preview_source"] == TINY and e["preview_step"] > 3)
    a1111 = httpx.get(f"{url}/sdapi/v1/progress").json()  # the same job, the same source, Automatic1111's shape
    generating.wait()
    assert entry["id"] == "watched-1" and entry["state"] == "running" and entry["steps"] == LONG_STEPS
    assert entry["step"] >= entry["preview_step"] and 0 < entry["progress"] < 1 and entry["eta_s"] > 0
    assert a1111["state"]["job"] == "watched-1" and a1111["textinfo"].startswith(f"preview: {TINY}")
    assert _png(a1111["current_image"]).shape == (128, 128, 3)

    got = _png(entry["preview"])
    sample = _unet_input(tiny_vae_pipe, generating.body, entry["preview_step"])
    latents = sample[:1, : tiny_vae_pipe.manifest.latent_channels]
    expected = np.asarray(to_pil(decode_latents(tiny_vae_pipe.sessions, tiny_vae_pipe.manifest, latents, "tiny"))[0])
    assert got.shape == (128, 128, 3)  # full resolution
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    assert (got != expected).mean() <= PIXELS_OFF_BY_ONE
    decodes = _tiny_decodes(url) - before
    assert 1 <= decodes <= LONG_STEPS  # one per step while watched, at most


def test_an_unwatched_job_runs_no_tiny_decode(tiny_vae_server: ServerProcess) -> None:
    url = tiny_vae_server.url
    before = _tiny_decodes(url)
    generating = Generating(url, "unwatched-1", seed=8, steps=100)
    entry = _poll(url, "unwatched-1", generating, lambda e: e["step"] > 0, skip_preview=True)  # progress only
    assert entry["preview"] is None and entry["preview_source"] is None
    generating.wait()
    assert _tiny_decodes(url) == before


def test_without_a_tiny_vae_the_preview_is_the_linear_map(plain_server: ServerProcess) -> None:
    url = plain_server.url
    generating = Generating(url, "linear-1", seed=9)
    entry = _poll(url, "linear-1", generating, lambda e: e["preview"] is not None)
    generating.wait()
    assert entry["preview_source"] == LINEAR
    assert _png(entry["preview"]).shape == (16, 16, 3)  # one pixel per latent pixel
    assert _tiny_decodes(url) == 0


def test_the_native_progress_route_with_no_job_and_an_unknown_id(plain_server: ServerProcess) -> None:
    url = plain_server.url
    assert httpx.get(f"{url}/v1/progress").json() == {"jobs": [], "queued": 0}
    unknown = httpx.get(f"{url}/v1/progress", params={"id": "no-such-request"})
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["message"] == "no request with id 'no-such-request' is running or waiting (finished ones are gone)"
    assert "\n" not in error["message"] and "Traceback" not in unknown.text


# -- in the worker's place, in-process: what the tiny decode costs a job, and a failing one ------------------


def _spied(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    """The networks the pipeline's sessions run from now on; its tiny decoder raising where ``fail``."""
    calls: list[str] = []
    run_all = pipe.sessions.run_all

    def spy(network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(network)
        if fail and network == TINY_DECODER:
            raise RuntimeError("the tiny decoder broke")
        return run_all(network, **feeds)

    monkeypatch.setattr(pipe.sessions, "run_all", spy)
    return calls


def _run_watched(pipe: Pipeline, previewer: Previewer, state: JobPreview, steps: int) -> object:
    plan = pipe.plan("txt2img", Request(PROMPT, seed=3, num_inference_steps=steps, scheduler="ddim", **SIZE))
    step = iter(range(steps))

    def on_sample(sample: np.ndarray, runner: object) -> None:
        previewer.on_sample(state, sample, next(step), runner)

    (result,), _ = run_batch(pipe, [BatchCall(plan, on_sample=on_sample)])
    return result


def test_the_tiny_vae_decodes_only_while_watched(tiny_vae_pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    previewer = Previewer(tiny_vae_pipe.manifest, linear=None)
    unwatched, watched = JobPreview(), JobPreview(watched_until=float("inf"))
    calls = _spied(tiny_vae_pipe, monkeypatch)
    _run_watched(tiny_vae_pipe, previewer, unwatched, steps=4)
    assert calls.count(TINY_DECODER) == 0 and unwatched.tiny is None
    _run_watched(tiny_vae_pipe, previewer, watched, steps=4)
    assert calls.count(TINY_DECODER) == 4  # one per step
    assert watched.tiny is not None and watched.tiny.step == 3 and watched.tiny.image.size == (128, 128)


def test_a_failing_tiny_decode_never_fails_the_generation(
    tiny_vae_pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reference = tiny_vae_pipe.txt2img(PROMPT, seed=3, num_inference_steps=4, scheduler="ddim", **SIZE)
    linear = LatentPreview.fit(reference.latents[0], reference.images[0])
    previewer = Previewer(tiny_vae_pipe.manifest, linear)
    state = JobPreview(watched_until=float("inf"))
    calls = _spied(tiny_vae_pipe, monkeypatch, fail=True)
    with caplog.at_level(logging.WARNING, logger="sdtrt.serve.preview"):
        result = _run_watched(tiny_vae_pipe, previewer, state, steps=4)
    np.testing.assert_array_equal(result.latents, reference.latents)
    assert calls.count(TINY_DECODER) == 1  # tried once, then the job's previews are the linear map's
    assert state.failed and "the tiny VAE's preview failed" in caplog.text
    shown = previewer.show(state)
    assert shown is not None and shown.source == LINEAR and shown.step == 3


def test_the_preview_benchmark_measures_watched_beside_unwatched(tiny_vae_export: Path) -> None:
    from benchmarks.preview import measure

    row = measure(tiny_vae_export, "ort-cpu", None, size=64, steps=2, rounds=1)
    assert row["decodes"] == 2  # the watched run's two steps; the unwatched run decoded nothing
    assert row["s_per_step_watched"] > 0 and row["s_per_step_unwatched"] > 0 and row["tiny_decode_s"] > 0


def test_the_worker_opens_the_tiny_decoder_at_warm_up(tiny_vae_export: Path) -> None:
    """So a watched job's first preview opens no session."""
    from sdtrt.serve.config import ServeConfig
    from sdtrt.serve.metrics import Metrics
    from sdtrt.serve.worker import ModelWorker

    worker = ModelWorker(tiny_vae_export, "tiny", ServeConfig((tiny_vae_export,), backend="ort-cpu"), Metrics())
    worker.start()
    try:
        assert worker.ready.wait(120) and worker.failure is None and worker.pipeline is not None
        assert worker.previews is not None and worker.previews.tiny and worker.previews.linear is not None
        assert worker.pipeline.sessions.artifact.is_open(TINY_DECODER)
    finally:
        worker.stop()
