"""`sdtrt serve`: run the app on uvicorn, or as a Ray Serve deployment with ``--ray``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from sdtrt.engine.manifest import load_manifest
from sdtrt.serve.address import check_address
from sdtrt.serve.app import create_app
from sdtrt.serve.config import ServeConfig, ServeLimits, parse_lora
from sdtrt.serve.logs import setup_logging

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The server's config from `sdtrt serve`'s arguments; each folder's manifest is read first (one clear error)."""
    for folder in args.folders:
        load_manifest(folder)
    limits = ServeLimits(
        max_side=args.max_side,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_prompt_chars=args.max_prompt_chars,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    config = ServeConfig(
        models=tuple(Path(folder) for folder in args.folders),
        backend=args.backend,
        precision=args.precision,
        loras=tuple(parse_lora(text) for text in args.lora),
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        deadline_s=args.deadline,
        api_key=None,
        limits=limits,
    )
    return config.with_env_api_key()


def serve(args: argparse.Namespace) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    check_address(args.host, args.port)  # before the models load: a bad --port is no minute's wait
    config = config_from_args(args)
    setup_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if args.ray:
        from sdtrt.serve.ray_app import run_on_ray

        run_on_ray(config, args.host, args.port, args.replicas, args.replica_cpus, args.replica_gpus)
        return
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches it can use it (set SDTRT_API_KEY)", args.host)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_config=None, access_log=False)
