"""`sdtrt serve --ray`: the same app as a Ray Serve deployment on a local Ray cluster (loopback only), two CPU
replicas of the demo model. Killing a replica mid-load loses no request without telling its client: every
request is answered, with its image or with an error, and the controller brings a new replica up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from test_serve import png  # noqa: E402

from benchmarks.serving import ServerProcess  # noqa: E402

REQUESTS, CLIENTS = 32, 8


@pytest.fixture(scope="module")
def ray_server(demo_export: Path) -> Iterator[ServerProcess]:
    args = [str(demo_export), "--backend", "ort-cpu", "--ray", "--replicas", "2", "--replica-cpus", "1"]
    proc = ServerProcess(args, env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=180)
    yield proc
    proc.close()


def _replica_pids(server: ServerProcess, tries: int = 40) -> set[int]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        return {c.get("/healthz").json()["pid"] for _ in range(tries)}


@pytest.mark.slow  # ~60 s on 2 cores: a Ray cluster and two replicas start; the config round trip below stays fast
def test_two_replicas_serve_and_a_killed_replica_loses_no_request_silently(ray_server: ServerProcess) -> None:
    pids = _replica_pids(ray_server)
    assert len(pids) == 2, pids
    victim = min(pids)

    async def one(c: httpx.AsyncClient, slots: asyncio.Semaphore, seed: int) -> tuple[int, int, bytes]:
        async with slots:
            r = await c.post("/v1/txt2img", json={"prompt": "a red circle", "seed": seed, "num_inference_steps": 20})
            return seed, r.status_code, r.content

    async def load() -> list[tuple[int, int, bytes]]:
        slots = asyncio.Semaphore(CLIENTS)
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as c:
            tasks = [asyncio.ensure_future(one(c, slots, seed)) for seed in range(REQUESTS)]
            await asyncio.sleep(1.0)  # some answered, some running on each replica
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    answers = asyncio.run(asyncio.wait_for(load(), timeout=240))
    assert sorted(seed for seed, _, _ in answers) == list(range(REQUESTS))  # every request answered, once
    ok = [(seed, body) for seed, status, body in answers if status == 200]
    failed = [status for _, status, _ in answers if status != 200]
    assert all(status >= 500 for status in failed), failed  # told: an error status, never silence
    assert len(ok) >= REQUESTS // 2, f"{len(failed)} of {REQUESTS} failed"
    print(f"\nray: {len(ok)} of {REQUESTS} answered with an image, {len(failed)} with an error {sorted(set(failed))}")
    for seed, body in ok:
        answer = json.loads(body)
        assert answer["seed"] == seed
        png(answer["images"][0])

    deadline = time.monotonic() + 90  # the controller replaces the killed replica
    while time.monotonic() < deadline:
        pids = _replica_pids(ray_server, tries=10)
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(1)
    assert len(pids) == 2 and victim not in pids, pids
    after = httpx.post(f"{ray_server.url}/v1/txt2img", json={"prompt": "x", "num_inference_steps": 2}, timeout=60)
    assert after.status_code == 200, after.text


def test_the_deployment_carries_the_config_and_no_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What each replica is built from: the folders as absolute paths, every option, never the key itself."""
    from sdtrt.serve.config import ServeConfig, ServeLimits
    from sdtrt.serve.ray_app import config_from_dict, config_to_dict, deployment

    model = tmp_path / "m"
    config = ServeConfig((model,), backend="ort-cpu", max_batch=8, api_key="secret", limits=ServeLimits(max_steps=9))
    app = deployment(config, replicas=None, cpus=2, gpus=1)
    bound = app._bound_deployment  # Ray's own record of what it schedules
    assert bound._deployment_config.autoscaling_config.target_ongoing_requests == 16  # scales on queue depth
    assert bound.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    args = bound.init_args[0]
    assert "secret" not in json.dumps(args) and args["models"] == [str(model.resolve())]
    monkeypatch.setenv("SDTRT_API_KEY", "from-env")
    again = config_from_dict(args)
    assert again.api_key == "from-env" and again.limits.max_steps == 9 and again.max_batch == 8
    assert config_to_dict(again)["models"] == args["models"]


def test_the_ray_serve_config_file_is_valid_and_builds() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from sdtrt.serve.ray_app import build

    config = yaml.safe_load((Path(__file__).parents[1] / "sdtrt" / "serve" / "ray.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "sdtrt.serve.ray_app:build"
    app = build(application["args"])
    assert Path(app._bound_deployment.init_args[0]["models"][0]).is_absolute()
