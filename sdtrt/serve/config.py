"""What a server is started with: the models it loads, its queue and batching, and the limits on requests."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdtrt.engine.errors import InvalidInputError

ENV_API_KEY = "SDTRT_API_KEY"
API_KEY = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class ServeLimits:
    """Ceilings on one request; above any of them it is one 4xx JSON error before any work."""

    max_side: int | None = None  # pixels per side; None: the model's own ceiling (twice its native side)
    max_steps: int = 150
    max_images: int = 8  # per request (prompts x images)
    max_prompt_chars: int = 2000  # per prompt and per negative prompt
    max_body_bytes: int = 16 * 2**20  # the request body; images travel in it as base64


@dataclass(frozen=True)
class ServeConfig:
    """One server: its models (artifact folders, each served under its folder's name) and how it runs them."""

    models: tuple[Path, ...]
    backend: str = "auto"
    precision: str | None = None
    loras: tuple[tuple[str, Path], ...] = ()  # (model name, .safetensors path): loaded at scale 0, asked for by name
    queue_size: int = 64  # waiting requests per model; beyond it: 429 with Retry-After
    max_batch: int = 4  # images per UNet batch (each doubled under guidance); 1 turns batching off
    deadline_s: float = 300.0  # from arrival to answer; past it the request ends with 504
    api_key: str | None = field(default=None, repr=False)  # bearer token every route but /healthz and /readyz needs
    limits: ServeLimits = ServeLimits()
    warmup: bool = True  # one small generation per model before /readyz says ready

    def __post_init__(self) -> None:
        if not self.models:
            raise InvalidInputError("serve needs at least one artifact folder")
        names = [model_name(folder) for folder in self.models]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"two artifact folders share a name ({', '.join(names)}): models are named by it")
        for name, _ in self.loras:
            if name not in names:
                raise InvalidInputError(
                    f"--lora names model {name!r}, which is not served (models: {', '.join(names)})"
                )
        for what, value in (("queue_size", self.queue_size), ("max_batch", self.max_batch)):
            if value < 1:
                raise InvalidInputError(f"{what} must be at least 1, got {value}")
        if not self.deadline_s > 0:
            raise InvalidInputError(f"the deadline must be positive, got {self.deadline_s}")

    @property
    def model_names(self) -> list[str]:
        return [model_name(folder) for folder in self.models]

    def with_env_api_key(self) -> ServeConfig:
        """This config with the API key from SDTRT_API_KEY where none was given."""
        key = self.api_key or os.environ.get(ENV_API_KEY) or None
        if key is not None and not API_KEY.fullmatch(key):  # clients send it in a header: visible ASCII only
            raise InvalidInputError(f"{ENV_API_KEY} must be printable ASCII without spaces (it is sent in a header)")
        return replace(self, api_key=key)


def model_name(folder: Path) -> str:
    """The name a model is served under: its artifact folder's name."""
    return Path(folder).resolve().name


def parse_lora(text: str) -> tuple[str, Path]:
    """MODEL=PATH -> (model name, path)."""
    model, sep, path = text.partition("=")
    if not sep or not model or not path:
        raise InvalidInputError(
            f"--lora takes MODEL=PATH (a served model's name and a .safetensors file), got {text!r}"
        )
    return model, Path(path)
