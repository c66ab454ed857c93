"""A request planned once: the task's record, the checked request with its defaults filled in, the task's checked
arguments, the ControlNets, CFG on or off, and the key under which a server may batch it with others.

``make_plan`` is the one validation of a request: the Python API (``Pipeline.run``), the CLI and the server all
plan before they run, and ``Pipeline.execute`` runs a plan. What can be checked before a model is loaded (the
request's options and the task's own) is ``precheck``, which the CLI runs first and ``make_plan`` runs too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest
from sdtrt.runtime.conditioning import Conditioner
from sdtrt.runtime.control import CONTROL_OPTIONS, Control, check_control
from sdtrt.runtime.request import REQUEST_OPTIONS, Limits, Request
from sdtrt.runtime.sessions import Sessions
from sdtrt.runtime.step_cache import check_cache_options
from sdtrt.runtime.tasks import TASKS, Task, get_task
from sdtrt.runtime.vae import check_vae

CALL_OPTIONS = ("progress", "rng", "runner")  # what Pipeline.run takes beside the request and the task's own


@dataclass(frozen=True)
class Plan:
    """One request, checked and resolved for one loaded model."""

    task: Task
    request: Request  # checked: every default filled in
    arguments: Any  # the task's own arguments (its options dataclass), checked
    control: Control | None  # checked ControlNet options, images loaded; None without ControlNets
    cfg: bool  # classifier-free guidance: the UNet batch doubled
    batch_key: tuple | None  # plans with equal keys may share a UNet batch; None: runs alone

    @property
    def images(self) -> int:
        """Images the request draws: prompts x num_images."""
        return len(self.request.prompts) * self.request.num_images


def precheck(
    task: str | Task, request: Request, inputs: Mapping[str, Any], limits: Limits | None = None
) -> tuple[Task, Request, Any, dict[str, Any]]:
    """What can be checked without a model: the task, the request (its defaults filled in) and the task's own
    arguments. Returns the record, the checked request, the task's arguments and the ControlNet options given."""
    record = get_task(task) if isinstance(task, str) else task
    if not isinstance(request, Request):
        raise InvalidInputError(f"run takes a Request (sdtrt.runtime.request), got {type(request).__name__}")
    own = [argument.name for argument in record.arguments]
    if unknown := sorted(set(inputs) - set(own) - set(CONTROL_OPTIONS)):  # ControlNets: check_control's errors
        raise InvalidInputError(
            f"{record.name} has no option {', '.join(map(repr, unknown))} (its own: {', '.join(own)}; "
            f"shared: {', '.join(REQUEST_OPTIONS)}, {', '.join(CALL_OPTIONS)})"
        )
    checked = request.checked(record, limits)
    arguments = record.check_arguments({name: value for name, value in inputs.items() if name in own})
    control = {name: inputs[name] for name in CONTROL_OPTIONS if name in inputs}
    return record, checked, arguments, control


def make_plan(
    task: str | Task,
    request: Request,
    inputs: Mapping[str, Any],
    *,
    limits: Limits,
    sessions: Sessions,
    conditioner: Conditioner,
) -> Plan:
    """``request`` for ``task`` with the task's own ``inputs``, checked against the model behind ``sessions``."""
    record, checked, arguments, control_options = precheck(task, request, inputs, limits)
    control_tasks = [name for name, t in TASKS.items() if t.controlnets]
    control = check_control(record.name, control_options, sessions, control_tasks)
    manifest = sessions.artifact.manifest
    check_vae(checked.vae, manifest, sessions.artifact.folder)
    check_cache_options(checked.cache_interval, checked.cache_branch, manifest, sessions, control is not None)
    # diffusers' rule: guidance 1 (or less) is the plain conditional model; LCM-distilled UNets take the
    # guidance scale as an input instead (timestep_cond) and never double the batch
    cfg = checked.guidance_scale > 1.0 and not conditioner.guidance_embedded
    key = batch_key(record, checked, arguments, cfg, manifest) if control is None else None
    return Plan(record, checked, arguments, control, cfg, key)


def batch_key(task: Task, request: Request, arguments: Any, cfg: bool, manifest: Manifest) -> tuple | None:
    """What requests must share to run as one UNet batch in step: the task, the UNet's input size (the size asked
    for, the input images' sizes), steps, scheduler, CFG on/off and the options the record names; None where the
    task is not batched, a Python-only option (latents, a two-stage split) is set, or steps are cached (a cached
    request runs its own graphs, never the plain UNet the batch shares: it would hold the others' rendezvous)."""
    if not task.batchable or request.cache_interval > 1:
        return None
    own = {argument.name: getattr(arguments, argument.name) for argument in task.arguments}
    for argument in task.arguments:
        if argument.python_only and own[argument.name] is not argument.default:
            return None
    sizes = []
    for name in task.images:
        if not isinstance(own[name], Image.Image):  # a path or an array: its size is not known yet
            return None
        sizes.append(own[name].size)
    height, width = request.height, request.width
    if not task.images:  # its size is the request's, else the model's native one
        height = manifest.default_height if height is None else height
        width = manifest.default_width if width is None else width
    options = tuple(own[name] for name in task.batch_options)
    return task.name, height, width, tuple(sizes), request.num_inference_steps, request.scheduler, cfg, options
