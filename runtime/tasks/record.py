"""The record of a task, its options, and the one registry every face reads.

A task is one module (runtime/tasks/txt2img.py, ...) holding a ``Task``: the run function, its own arguments as a
frozen dataclass, its default steps and guidance, and what it takes (a size, ControlNets) and allows (batching in
a server). The Python API's task methods, ``Pipeline.plan``, the CLI's subcommands and the HTTP bodies are all
made from these records, so a default is written once: in the dataclass field (``option``).

An argument is an input image (``image_input``: required, positional in Python and on the command line, base64
over HTTP) or an option (``option``: a default, a one-line help, bounds). ``python_only`` options (NumPy latents,
a two-stage split) have no command-line flag and no HTTP field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime.request import is_integer, is_real

if TYPE_CHECKING:
    from sdtrt.runtime.generation import Generation, GenerationResult

KINDS = ("image", "int", "float", "bool", "array")  # what an argument holds


def option(
    default: Any,
    help: str,
    *,
    kind: str | None = None,
    low: float | None = None,
    high: float | None = None,
    default_help: str | None = None,
    python_only: bool = False,
    task_checks: bool = False,
) -> Any:
    """A task option: a dataclass field with ``default`` and what the faces show of it.

    ``kind`` is taken from the default where it is not None; ``low``/``high`` bound numbers (checked once, by
    check_arguments); ``default_help`` says what a default of None means (e.g. "the model's native tile");
    ``task_checks``: the bounds depend on the model, and the task checks the value itself.
    """
    kind = kind or {bool: "bool", int: "int", float: "float"}.get(type(default))
    if kind not in KINDS:
        raise TypeError(f"option with default {default!r} needs a kind ({', '.join(KINDS)})")
    meta = {
        "kind": kind,
        "help": help,
        "low": low,
        "high": high,
        "default_help": default_help,
        "python": python_only,
        "task_checks": task_checks,
    }
    return dataclasses.field(default=default, metadata=meta)


def image_input(help: str) -> Any:
    """A required input image (a path, a PIL image or an array in Python; a file on the command line; base64 over
    HTTP)."""
    meta = {"kind": "image", "help": help, "low": None, "high": None, "default_help": None, "python": False}
    return dataclasses.field(metadata={**meta, "task_checks": True})


@dataclass(frozen=True)
class Argument:
    """One field of a task's arguments dataclass, as the faces see it."""

    name: str
    kind: str
    help: str
    default: Any = dataclasses.MISSING  # MISSING: required (an input image)
    low: float | None = None
    high: float | None = None
    default_help: str | None = None
    python_only: bool = False
    task_checks: bool = False  # the task checks the value (its bounds depend on the model)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def default_text(self) -> str:
        """The default as the CLI's --help and the docs say it."""
        if self.default is None:
            return self.default_help or "none"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def check(self, value: Any) -> Any:
        """``value`` checked against this argument's kind and bounds (Python ints and floats); one error otherwise."""
        if self.task_checks or (value is None and self.default is None):
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidInputError(f"{self.name} must be True or False, got {value!r}")
            return value
        if self.kind not in ("int", "float"):
            return value  # images and arrays: the task loads and checks them
        integer = self.kind == "int"
        ok = is_integer(value) if integer else is_real(value) and math.isfinite(value)
        ok = ok and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if not ok:
            what = "an integer" if integer else "a number"
            if self.low is not None and self.high is not None:
                bounds = f" from {self.low:g} to {self.high:g}"
            elif self.low is not None:
                bounds = f" >= {self.low:g}"
            else:
                bounds = "" if integer else " (finite)"
            raise InvalidInputError(f"{self.name} must be {what}{bounds}, got {value!r}")
        return int(value) if integer else float(value)


def arguments(options: type) -> tuple[Argument, ...]:
    """The fields of a task's arguments dataclass, in order."""
    found = []
    for f in dataclasses.fields(options):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        found.append(
            Argument(
                f.name,
                m["kind"],
                m["help"],
                default,
                m["low"],
                m["high"],
                m["default_help"],
                m["python"],
                m["task_checks"],
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class Task:
    """One generation task: how it runs, what it takes, and its defaults."""

    name: str
    run: Callable[[Generation, Any], GenerationResult]  # run(generation, arguments) -> result
    options: type  # a frozen dataclass of the task's own arguments: input images first, then options
    summary: str  # one line: the CLI's and the HTTP route's
    doc: str  # the Python method's docstring beyond the summary
    steps: int  # denoising steps when a request leaves them out
    guidance: float = 7.5  # guidance scale when a request leaves it out
    sized: bool = True  # takes height and width (False: its output size follows its input)
    size_help: str = "the model's native size"  # what a size left out means
    controlnets: bool = False  # takes ControlNets (runtime/control.py)
    batchable: bool = False  # a server may run requests that agree as one UNet batch
    batch_options: tuple[str, ...] = ()  # own options requests must agree on to share a batch
    command: str = ""  # the CLI subcommand (default: the name)

    @property
    def cli_name(self) -> str:
        return self.command or self.name

    @property
    def arguments(self) -> tuple[Argument, ...]:
        return arguments(self.options)

    @property
    def images(self) -> tuple[str, ...]:
        """The input images it takes, in order."""
        return tuple(a.name for a in self.arguments if a.kind == "image")

    def check_arguments(self, given: Mapping[str, Any]) -> Any:
        """The task's arguments dataclass from ``given`` (its own names only), defaults filled in, each checked."""
        values = {}
        for argument in self.arguments:
            if argument.name in given:
                values[argument.name] = argument.check(given[argument.name])
            elif argument.required:
                raise InvalidInputError(f"{self.name} needs {argument.name}")
        return self.options(**values)


TASKS: dict[str, Task] = {}  # name -> record, in the order the faces list them


def register(task: Task) -> Task:
    """Add ``task`` to the registry (a name may be registered once)."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is registered already")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a registered task (tests that register a task of their own)."""
    TASKS.pop(name, None)


def get_task(name: str) -> Task:
    """The task named ``name``; one error naming the tasks otherwise."""
    if not isinstance(name, str) or name not in TASKS:
        raise InvalidInputError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]
