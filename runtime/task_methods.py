"""The Python API's task methods (``pipe.txt2img(prompt, ...)``), made from the task records: the prompt, the
task's input images, then keyword options, with the record's defaults in the method's signature."""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime.control import CONTROL_OPTIONS
from sdtrt.runtime.plan import CALL_OPTIONS
from sdtrt.runtime.request import REQUEST_OPTIONS, Request
from sdtrt.runtime.tasks import Task

if TYPE_CHECKING:
    from collections.abc import Callable

    from sdtrt.runtime.generation import GenerationResult
    from sdtrt.runtime.pipeline import Pipeline

SIZE_OPTIONS = ("height", "width")


def shared_defaults(task: Task) -> dict[str, Any]:
    """The Request's options as ``task`` fills them in when left out: its steps and guidance, the rest None/1."""
    fields = {f.name: f.default for f in dataclasses.fields(Request) if f.name in REQUEST_OPTIONS}
    fields.update(num_inference_steps=task.steps, guidance_scale=task.guidance)
    return {name: value for name, value in fields.items() if task.sized or name not in SIZE_OPTIONS}


def task_method(pipe: Pipeline, task: Task) -> Callable[..., GenerationResult]:
    """``pipe``'s method for ``task``: ``method(prompt, *images, **options)`` -> ``pipe.run``."""

    def method(prompt: Any, *images: Any, **options: Any) -> GenerationResult:
        if len(images) > len(task.images):
            raise InvalidInputError(
                f"{task.name} takes the prompt and {len(task.images)} image(s) ({', '.join(task.images) or 'none'}) "
                f"as positional arguments, got {1 + len(images)}: pass options by name"
            )
        named = dict(zip(task.images, images, strict=False))
        if twice := sorted(set(named) & set(options)):
            raise InvalidInputError(f"{task.name} got {twice[0]} twice: by position and by name")
        options |= named
        shared = {name: options.pop(name) for name in REQUEST_OPTIONS if name in options}
        call = {name: options.pop(name) for name in CALL_OPTIONS if name in options}
        return pipe.run(task.name, Request(prompt, **shared), **call, **options)

    method.__name__ = method.__qualname__ = task.name
    method.__doc__ = f"{task.summary[0].upper()}{task.summary[1:]}.\n\n{task.doc}"
    method.__signature__ = signature(task)  # type: ignore[attr-defined]
    return method


def signature(task: Task) -> inspect.Signature:
    """The task method's signature: prompt, images, then keyword options with the record's defaults."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("prompt", positional)]
    params += [inspect.Parameter(name, positional) for name in task.images]
    params += [inspect.Parameter(name, keyword, default=value) for name, value in shared_defaults(task).items()]
    params += [inspect.Parameter(a.name, keyword, default=a.default) for a in task.arguments if a.kind != "image"]
    if task.controlnets:
        params += [inspect.Parameter(name, keyword, default=None) for name in CONTROL_OPTIONS]
    params += [inspect.Parameter(name, keyword, default=None) for name in CALL_OPTIONS]
    return inspect.Signature(params)
