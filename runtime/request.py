"""The options every generation task shares, as one object: what the Python API's task methods
build from their keyword arguments, and what a server deserializes from a request body.

A Request is plain data (strings and numbers); ``checked`` validates it for one task and fills in
that task's defaults, so every task refuses bad options with the same one-line errors. Numbers may be
any integral or real numbers (NumPy's included; never bools): a checked request holds Python ints and
floats. Limits is the ceiling a request is refused above before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime.step_cache import check_cache_request
from sdtrt.runtime.vae import VAES

if TYPE_CHECKING:
    from sdtrt.runtime.tasks import Task

DEFAULT_MAX_IMAGES = 16  # images per request (prompts x num_images): a 4x4 grid
ENV_MAX_SIDE, ENV_MAX_IMAGES = "SDTRT_MAX_SIDE", "SDTRT_MAX_IMAGES"


@dataclass(frozen=True)
class Limits:
    """The most a request may ask for: pixels per image side, images per request. Above them a request is
    one error before any work, instead of an allocation failure after seconds of it."""

    max_side: int
    max_images: int = DEFAULT_MAX_IMAGES
    side_origin: str = ""  # where max_side came from, for the error: the model's default, the argument, the env
    images_origin: str = "the default"

    @classmethod
    def resolve(
        cls, default_side: int, side_origin: str, max_side: int | None = None, max_images: int | None = None
    ) -> Limits:
        """The arguments, else the environment (SDTRT_MAX_SIDE, SDTRT_MAX_IMAGES), else the defaults:
        ``default_side`` (said to come from ``side_origin``) and DEFAULT_MAX_IMAGES."""
        side, side_origin = _limit("max_side", max_side, ENV_MAX_SIDE, default_side, side_origin)
        images, images_origin = _limit("max_images", max_images, ENV_MAX_IMAGES, DEFAULT_MAX_IMAGES, "the default")
        return cls(side, images, side_origin, images_origin)

    def check_side(self, name: str, size: int) -> None:
        if size > self.max_side:
            raise InvalidInputError(
                f"{name} {size} is above the ceiling of {self.max_side} pixels per side ({self.side_origin}): "
                f"ask for less, or raise it with Pipeline.load(..., max_side=N) or {ENV_MAX_SIDE}=N if memory allows"
            )

    def check_images(self, prompts: int, num_images: int) -> None:
        if prompts * num_images > self.max_images:
            raise InvalidInputError(
                f"{prompts * num_images} images in one request ({prompts} prompt(s) x num_images {num_images}) is "
                f"above the ceiling of {self.max_images} ({self.images_origin}): ask for fewer, or raise it with "
                f"Pipeline.load(..., max_images=N) or {ENV_MAX_IMAGES}=N if memory allows"
            )


def _limit(name: str, value: Any, variable: str, default: int, origin: str) -> tuple[int, str]:
    """(the limit, where it came from): ``value``, else the environment's ``variable``, else ``default``."""
    if value is not None:
        if not is_integer(value) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
        return int(value), f"{name}={value}"
    text = os.environ.get(variable, "").strip()
    if not text:
        return default, origin
    if not text.isdecimal() or int(text) < 1:
        raise InvalidInputError(f"{variable} must be an integer >= 1, got {text!r}")
    return int(text), f"{variable}={text}"


@dataclass(frozen=True)
class Request:
    """One generation request's shared options. None means the model's or the task's default."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None  # used under classifier-free guidance; default ""
    num_inference_steps: int | None = None  # default: the task's (its record in runtime/tasks)
    guidance_scale: float | None = None  # > 1 turns on classifier-free guidance; default: the task's
    height: int | None = None  # pixels; default: the model's native size, or the input image's
    width: int | None = None
    seed: int | None = None  # default: a fresh one, reported in the result
    num_images: int = 1  # per prompt
    scheduler: str | None = None  # a name in sdtrt.runtime.schedulers.SCHEDULERS; default: the model's own
    vae: str = "full"  # "tiny": decode (and encode) with the export's tiny VAE (runtime/vae.py)
    cache_interval: int = 1  # step caching (runtime/step_cache.py): the whole UNet every N-th step; 1: off
    cache_branch: int | None = None  # DeepCache's skip branch; default: the one the export's graphs are for
    cache_schedule: str = "uniform"  # or "nonuniform": DeepCache's non-uniform placement of the full steps

    @property
    def prompts(self) -> list[str]:
        """The prompts as a list (of a checked request)."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per prompt, or None when none was given (of a checked request)."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt)

    def checked(self, task: str | Task, limits: Limits | None = None) -> Request:
        """This request validated for ``task`` (a name or a record; and ``limits``), the task's defaults filled in,
        its numbers Python ints and floats; one InvalidInputError otherwise."""
        from sdtrt.runtime.tasks import get_task  # the registry imports this module

        record = get_task(task) if isinstance(task, str) else task
        steps, guidance = record.steps, record.guidance
        request = dataclasses.replace(
            self,
            prompt=_listed(self.prompt),
            negative_prompt=_listed(self.negative_prompt),
            num_inference_steps=_plain(steps if self.num_inference_steps is None else self.num_inference_steps),
            guidance_scale=_plain(guidance if self.guidance_scale is None else self.guidance_scale),
            height=_plain(self.height),
            width=_plain(self.width),
            seed=_plain(self.seed),
            num_images=_plain(self.num_images),
            cache_interval=_plain(self.cache_interval),
            cache_branch=_plain(self.cache_branch),
        )
        request._check()
        if not record.sized and (self.height is not None or self.width is not None):
            raise InvalidInputError(f"{record.name} takes no height or width: its output size follows its input")
        if limits is not None:
            limits.check_images(len(request.prompts), request.num_images)
            for name in ("height", "width"):
                if is_integer(size := getattr(request, name)):
                    limits.check_side(name, size)
        return request

    def _check(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {self.prompt!r}")
        steps, guidance, images = self.num_inference_steps, self.guidance_scale, self.num_images
        if not is_integer(steps) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not is_real(guidance) or not math.isfinite(guidance) or guidance < 0:
            raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        if not is_integer(images) or images < 1:
            raise InvalidInputError(f"num_images must be an integer >= 1, got {images!r}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise InvalidInputError(f"scheduler must be a scheduler's name, got {self.scheduler!r}")
        check_cache_request(self.cache_interval, self.cache_branch, self.cache_schedule)
        if self.vae not in VAES:
            raise InvalidInputError(f"vae must be one of {', '.join(map(repr, VAES))}, got {self.vae!r}")
        if self.seed is not None and (not is_integer(self.seed) or not 0 <= self.seed < 2**64):
            raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            negatives = self.negative_prompt
            if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
                raise InvalidInputError(
                    "negative_prompt must be a string or a list of strings, one per prompt; "
                    f"got {self.negative_prompt!r}"
                )
            if len(negatives) != len(prompts):
                raise InvalidInputError(
                    f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt"
                )


REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(Request) if f.name != "prompt")  # beside the prompt


def is_integer(value: object) -> bool:
    """An integral number (int, numpy.int64, ...), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (int, float, numpy.float32, ...), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """A NumPy (or other) integral or real number as a Python int or float; anything else as it is."""
    if is_integer(value):
        return int(value)
    return float(value) if is_real(value) else value


def _listed(value: Any) -> Any:
    """A list of the items of an ordered iterable of prompts (a tuple, a generator); anything else (a string, a
    dict, a set: refused by the check) as it is."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, Set)):
        return list(value)
    return value
