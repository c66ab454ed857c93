"""NumPy versions of the diffusers schedulers Stable Diffusion pipelines use, matching them step by step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdtrt.engine.errors import InvalidInputError

from .base import Scheduler
from .ddim import DDIM
from .dpm import DPMSolverPP2M, DPMSolverPP2MKarras
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .lms import LMS
from .pndm import PNDM

__all__ = ["SCHEDULERS", "Scheduler", "make_scheduler"]

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MKarras, LMS, LCM)
}

# diffusers class name -> ours (DPMSolverMultistepScheduler is resolved by use_karras_sigmas).
_BY_DIFFUSERS_CLASS = {cls.diffusers_class: name for name, cls in SCHEDULERS.items() if cls is not DPMSolverPP2MKarras}


def _name_from_config(config: Mapping[str, Any]) -> str:
    class_name = config.get("_class_name")
    if class_name not in _BY_DIFFUSERS_CLASS:
        raise InvalidInputError(
            f"scheduler config names class {class_name!r}, which sdtrt does not implement "
            f"(known: {', '.join(_BY_DIFFUSERS_CLASS)}); pick one of {', '.join(SCHEDULERS)} by name"
        )
    if class_name != DPMSolverPP2M.diffusers_class:
        return _BY_DIFFUSERS_CLASS[class_name]
    algorithm, order = config.get("algorithm_type", "dpmsolver++"), config.get("solver_order", 2)
    if (algorithm, order) != ("dpmsolver++", 2):
        raise InvalidInputError(
            f"scheduler config asks for DPM-Solver algorithm_type={algorithm!r}, solver_order={order!r}; "
            "sdtrt implements dpmsolver++ of order 2 only: pick dpmpp_2m or dpmpp_2m_karras by name"
        )
    return DPMSolverPP2MKarras.name if config.get("use_karras_sigmas") else DPMSolverPP2M.name


def make_scheduler(name: str | None, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
    """The scheduler ``name`` (None: the one the config's ``_class_name`` names) configured from a diffusers
    scheduler config of any class, like ``DiffusersClass.from_config(config, **overrides)``.
    """
    if name is None:
        name = _name_from_config(config)
    if name not in SCHEDULERS:
        raise InvalidInputError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name](config, **overrides)
