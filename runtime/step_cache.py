"""Step caching (DeepCache) in the denoising loop: which steps run the whole UNet, and the shallow one in between.

On a full step the ``unet_cache`` graph returns the noise prediction and the deep feature at the export's cache
branch; on the steps between, ``unet_shallow`` takes the kept feature and runs only the UNet's outer layers
(export/step_cache.py). ``cache_interval`` N runs the whole UNet every N-th step of a run (1: never cached, the
plain UNet); the "nonuniform" schedule spends the same number of full steps but packs them where the picture's
layout forms (DeepCache's non-uniform 1:N strategy: more full steps around a centre early in the schedule).
Steps count from the first one a run takes (img2img's first), as DeepCache's helper counts them.
"""

from __future__ import annotations

import math
import numbers
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest

if TYPE_CHECKING:  # runtime/sessions.py imports runtime/request.py, which checks the options here
    from sdtrt.runtime.runner import NetworkRunner
    from sdtrt.runtime.sessions import Sessions

CACHE, SHALLOW, FEATURE = "unet_cache", "unet_shallow", "feature"
SCHEDULES = ("uniform", "nonuniform")
MAX_INTERVAL = 1000  # as many as a schedule's steps may be (a model's training timesteps)
# DeepCache's non-uniform schedule: full steps at centre + sign(x) |x|^power for x evenly spaced, the power
# lowered from POWER until they are distinct; the centre at CENTRE of the run (its 15 of 50 steps)
POWER, CENTRE = 1.4, 0.3


def check_cache_request(interval: Any, branch: Any, schedule: Any) -> None:
    """One InvalidInputError line for cache options no export could run (Request's own check). An interval above
    a run's steps runs the whole UNet on its first step only."""
    if not _integer(interval) or not 1 <= interval <= MAX_INTERVAL:
        raise InvalidInputError(
            f"cache_interval must be an integer from 1 (no caching) to {MAX_INTERVAL}, got {interval!r}"
        )
    if branch is not None and (not _integer(branch) or branch < 0):
        raise InvalidInputError(f"cache_branch must be an integer >= 0 (DeepCache's skip branch), got {branch!r}")
    if schedule not in SCHEDULES:
        raise InvalidInputError(f"cache_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_cache_options(
    interval: int, branch: int | None, manifest: Manifest, sessions: Sessions, controlled: bool
) -> None:
    """One InvalidInputError line when a request's (checked) cache options cannot run on this export."""
    if interval == 1:
        return
    folder = sessions.artifact.folder
    if manifest.step_cache is None or SHALLOW not in manifest.components:
        raise InvalidInputError(
            f"cache_interval {interval} needs the step-cache graphs, which {folder} has none of: attach them with "
            f"`sdtrt add-step-cache {shlex.quote(str(folder))}` (or export with --step-cache)"
        )
    held = manifest.step_cache["branch"]
    if branch is not None and branch != held:
        raise InvalidInputError(
            f"cache_branch {branch}: the step-cache graphs of {folder} are for branch {held}; attach them for "
            f"branch {branch} with `sdtrt add-step-cache {shlex.quote(str(folder))} --branch {branch} --overwrite`"
        )
    if controlled:
        raise InvalidInputError("step caching does not take ControlNets yet: use cache_interval 1 with a control image")
    if sessions.loras and any(sessions.artifact.weight_map(graph) is None for graph in (CACHE, SHALLOW)):
        raise InvalidInputError(
            f"the step-cache graphs of {folder} have no weight maps, which LoRA needs (attached by an older sdtrt): "
            f"attach them again with `sdtrt add-step-cache {shlex.quote(str(folder))} --overwrite`, or use "
            "cache_interval 1"
        )


def full_steps(steps: int, interval: int, schedule: str) -> frozenset[int]:
    """The steps (0 .. steps-1 of a run) that run the whole UNet: every ``interval``-th, or as many spread by
    DeepCache's non-uniform schedule."""
    if interval == 1 or steps <= 1:
        return frozenset(range(steps))
    if schedule == "uniform":
        return frozenset(range(0, steps, interval))
    count = math.ceil(steps / interval)
    centre = round(CENTRE * steps)
    power = POWER
    while power > 1:
        ends = np.array([-(centre ** (1 / power)), (steps - centre) ** (1 / power)])
        x = np.linspace(ends[0], ends[1], count + 1)[:-1]
        chosen = {0, *(int(centre + np.sign(v) * abs(v) ** power) for v in x)}
        chosen = {s for s in chosen if 0 <= s < steps}
        if len(chosen) >= count:
            return frozenset(sorted(chosen)[:count])
        power -= 0.02
    return frozenset(range(0, steps, interval))  # too few steps to spread: the uniform ones


def begin_step_cache(runner: NetworkRunner, steps: int, interval: int, schedule: str) -> StepCache | None:
    """The cache of a run of ``steps`` steps, or None when ``interval`` is 1 (caching off)."""
    return None if interval == 1 else StepCache(runner, steps, interval, schedule)


class StepCache:
    """One run's cached UNet calls: the full graph on the full steps (keeping the feature), else the shallow one."""

    def __init__(self, runner: NetworkRunner, steps: int, interval: int, schedule: str) -> None:
        self.runner = runner
        self.full = full_steps(steps, interval, schedule)
        self.feature: np.ndarray | None = None  # (2B or B, C, h/s, w/s) float32, from the last full step

    def run(self, step: int, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The noise prediction at ``step`` (counted from the run's first) for the UNet's ``feeds``."""
        if step in self.full or self.feature is None or len(self.feature) != len(feeds["sample"]):
            outputs = self.runner.run_all(CACHE, **feeds)
            self.feature = outputs[FEATURE]
            return outputs["noise_pred"]
        return self.runner.run(SHALLOW, **feeds, feature=self.feature)
