"""The same app as a Ray Serve deployment: each replica loads its own pipelines (one worker per model) and
serves every route; Ray's proxy spreads requests over the replicas and scales their number on queue depth.

    sdtrt serve --ray --replicas 2 artifacts/tiny-sd-onnx      # a local Ray cluster (or RAY_ADDRESS's)
    serve run sdtrt/serve/ray.yaml                              # the config file: autoscaling, GPUs per replica

A replica answers only once its models are loaded and warmed up. A request in flight on a replica that
dies is answered with an error by Ray's proxy (never left without an answer); the controller starts a
new replica in its place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from sdtrt.engine.errors import SdtrtError
from sdtrt.serve.app import create_app
from sdtrt.serve.config import ServeConfig, ServeLimits
from sdtrt.serve.logs import setup_logging
from sdtrt.serve.server import Server

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0


@serve.deployment(name="sdtrt")
@serve.ingress()
class SdtrtDeployment:
    """One replica: a Server with its models loaded before the replica takes requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        setup_logging()
        self.server = Server(config_from_dict(config))
        self.server.start()
        for worker in self.server.workers.values():
            if not worker.ready.wait(LOAD_TIMEOUT_S) or worker.failure:
                raise SdtrtError(f"model {worker.name} did not load: {worker.failure or 'timed out'}")

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.server.config, self.server)

    def check_health(self) -> None:
        """Ray restarts a replica whose worker thread died."""
        for worker in self.server.workers.values():
            if not worker.alive:
                raise SdtrtError(f"the worker of model {worker.name} stopped")


def config_to_dict(config: ServeConfig) -> dict[str, Any]:
    """A ServeConfig as plain data (what a Ray Serve config file's ``args`` hold)."""
    data = asdict(config)
    data["models"] = [str(folder.resolve()) for folder in config.models]  # a replica's working folder is Ray's
    data["loras"] = [[model, str(path.resolve())] for model, path in config.loras]
    return data


def config_from_dict(data: dict[str, Any]) -> ServeConfig:
    """The inverse of config_to_dict; the API key, where the data hold none, from SDTRT_API_KEY."""
    data = dict(data)
    limits = ServeLimits(**data.pop("limits", {}))
    models = tuple(Path(folder) for folder in data.pop("models"))
    loras = tuple((model, Path(path)) for model, path in data.pop("loras", ()))
    return ServeConfig(models=models, loras=loras, limits=limits, **data).with_env_api_key()


def deployment(config: ServeConfig, replicas: int | None = None, cpus: float = 1.0, gpus: float = 0.0) -> Application:
    """The bound application: ``replicas`` replicas, or autoscaling from 1 to 4 on queue depth where None."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": config.queue_size + config.max_batch,  # a replica's own queue bounds the rest
    }
    if replicas is None:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 2 * config.max_batch,  # waiting + running per replica
        }
    else:
        options["num_replicas"] = replicas
    public = replace(config, api_key=None)  # the key travels in each replica's environment, not in Ray's state
    return SdtrtDeployment.options(**options).bind(config_to_dict(public))


def build(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder (``import_path: sdtrt.serve.ray_app:build`` in a config file): ``args``
    are config_to_dict's fields; the deployment's options (replicas, autoscaling, GPUs) come from the file."""
    config = config_from_dict(args)  # bad arguments: one clear error before any replica starts
    return SdtrtDeployment.bind(config_to_dict(replace(config, api_key=None)))  # folders made absolute here


def run_on_ray(config: ServeConfig, host: str, port: int, replicas: int, cpus: float, gpus: float) -> None:
    """Serve on Ray until SIGINT or SIGTERM: the cluster at RAY_ADDRESS, else a local one started here."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:  # a local cluster on the loopback interface
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config, replicas, cpus, gpus), name="sdtrt", route_prefix="/")
        log.info(
            "serving %s on Ray at http://%s:%d with %d replica(s)", ", ".join(config.model_names), host, port, replicas
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
