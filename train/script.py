"""What the training scripts share: their command line and their torch set-up."""

from __future__ import annotations

import argparse
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def settings_parser(prog: str, description: str, defaults: Any) -> argparse.ArgumentParser:
    """A training script's command line: --out, --overwrite and one flag per field of the ``defaults`` dataclass."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    return parser


def check_out(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    """Refuse ``out`` before any training (atomic_dir would too, but only after it)."""
    if out.exists() and not overwrite:
        parser.error(f"{out} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        parser.error(f"{out} is not a folder (--overwrite replaces a folder only)")


def parse_settings(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[Path, bool, dict[str, Any]]:
    """(--out, --overwrite, the other flags by field name) of ``argv``; ``--out`` refused before any training
    (check_out); progress logged to stderr."""
    args = vars(parser.parse_args(argv))
    out, overwrite = args.pop("out"), args.pop("overwrite")
    check_out(parser, out, overwrite)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return out, overwrite, args


def report_machine(threads: int) -> dict[str, str]:
    """What a training report says of the machine it ran on."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s)"
    return {"machine": machine, "torch": torch.__version__}


def set_up_torch(threads: int, seed: int) -> None:
    """Threads, the seed, and denormals flushed to zero: Adam's moments of weights that get no gradient (the
    token rows no caption uses) decay into denormals, which are 10x slower or more on x86."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
