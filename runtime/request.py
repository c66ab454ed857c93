"""The options every generation task shares, as one object: what the Python API's task methods
build from their keyword arguments, and what a server deserializes from a request body.

A Request is plain data (strings and numbers); ``checked`` validates it for one task and fills in
that task's defaults, so every task refuses bad options with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sdtrt.engine.errors import InvalidInputError

# task -> (denoising steps, guidance scale) when the request leaves them out
TASK_DEFAULTS = {
    "txt2img": (30, 7.5),
    "img2img": (50, 7.5),
    "inpaint": (50, 7.5),
    "outpaint": (50, 7.5),
    "upscale": (75, 9.0),
}
TASKS = tuple(TASK_DEFAULTS)
FIXED_SIZE_TASKS = ("upscale",)  # its output is 4x its input: no height/width of its own


@dataclass(frozen=True)
class Request:
    """One generation request's shared options. None means the model's or the task's default."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None  # used under classifier-free guidance; default ""
    num_inference_steps: int | None = None  # default: TASK_DEFAULTS
    guidance_scale: float | None = None  # > 1 turns on classifier-free guidance; default: TASK_DEFAULTS
    height: int | None = None  # pixels; default: the model's native size, or the input image's
    width: int | None = None
    seed: int | None = None  # default: a fresh one, reported in the result
    num_images: int = 1  # per prompt
    scheduler: str | None = None  # a name in sdtrt.runtime.schedulers.SCHEDULERS; default: the model's own

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

    def checked(self, task: str) -> Request:
        """This request validated for ``task``, its defaults filled in; one InvalidInputError otherwise."""
        steps, guidance = TASK_DEFAULTS[task]
        request = dataclasses.replace(
            self,
            prompt=_listed(self.prompt),
            negative_prompt=_listed(self.negative_prompt),
            num_inference_steps=steps if self.num_inference_steps is None else self.num_inference_steps,
            guidance_scale=guidance if self.guidance_scale is None else self.guidance_scale,
        )
        request._check()
        if task in FIXED_SIZE_TASKS and (self.height is not None or self.width is not None):
            raise InvalidInputError(f"{task} takes no height or width: its output size follows its input")
        return request

    def _check(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {self.prompt!r}")
        steps, guidance, images = self.num_inference_steps, self.guidance_scale, self.num_images
        if not _is_int(steps) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        if not _is_int(images) or images < 1:
            raise InvalidInputError(f"num_images must be an integer >= 1, got {images!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _listed(value: Any) -> Any:
    """A list of the items of an iterable of prompts (a tuple, a generator); anything else as it is."""
    return list(value) if isinstance(value, Iterable) and not isinstance(value, str) else value
