"""The networks of one opened export as the runtime runs them: sessions from the engine's doorway,
with the loaded LoRA adapters composed onto the weights of every session that has a weight map.

LoRA lives here, with the sessions, because a session opened after an adapter was loaded must
start from the same composed weights as those opened before it.

On the CPU, an export with the step-cache graphs runs the plain UNet's calls on ``unet_cache`` (the same weights
and inputs; its extra output, the cached feature, is dropped), so a process holds one copy of the UNet whether its
requests are cached or not (docs/per-image.md, Memory).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from sdtrt.engine.artifact import Artifact
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import rebuild_command
from sdtrt.engine.network_facts import NETWORK_FACTS
from sdtrt.engine.session import Session, TensorSpec
from sdtrt.runtime.lora import LoraAdapter, read_lora
from sdtrt.runtime.lora_apply import adapt
from sdtrt.runtime.request import is_real
from sdtrt.runtime.step_cache import CACHE, FEATURE

log = logging.getLogger(__name__)


class Sessions:
    """Sessions of an Artifact opened on first use, float32 in and out, LoRA adapters applied."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self._loras: dict[str, tuple[LoraAdapter, float]] = {}  # name -> (adapter, scale), in loading order

    def session(self, network: str) -> Session:
        """The session of ``network`` with the loaded adapters' weights (the plain UNet's: see ``serving``)."""
        return self._opened(self.serving(network))

    def _opened(self, network: str) -> Session:
        """The session of ``network`` itself, opened on first use with the loaded adapters' weights."""
        opened = self.artifact.is_open(network)
        session = self.artifact.session(network)
        weight_map = self.artifact.weight_map(network)
        if not opened and self._loras and weight_map is not None:
            adapt(session, weight_map, NETWORK_FACTS[network].lora_component, list(self._loras.values())).give(session)
        return session

    def serving(self, network: str) -> str:
        """The network whose session runs ``network``'s calls: ``unet_cache`` for the plain UNet's on a CPU backend
        where the export has the step-cache graphs, else ``network`` itself. Not with LoRA adapters loaded where
        ``unet_cache`` has no weight map (attached by an older sdtrt), nor where the UNet runs an int8 IR
        (``unet_cache`` has none). On ort-cpu this gives up ONNX Runtime's fused UNet (measured at 0.93x the plain
        graph's CPU time per step) for half the memory; on OpenVINO the two graphs compile alike.
        """
        artifact = self.artifact
        if network != "unet" or CACHE not in artifact or artifact.runs_int8(network):
            return network
        if self._loras and artifact.weight_map(CACHE) is None:
            return network
        return network if "gpu" in artifact.backend.record.needs else CACHE

    def inputs(self, network: str) -> dict[str, TensorSpec]:
        return self.artifact.inputs(network)

    def run_all(self, network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run a network, casting inputs to its dtypes and float outputs to float32.

        A float output holding NaN or inf is an error, never an image: the GPU backends' fp16 VAE decoder
        has re-run at fp32 already (engine/fallback.py), so what is left is the inputs' or the weights' fault.
        """
        served = self.serving(network)
        session = self._opened(served)
        cast = {name: array.astype(session.inputs[name].dtype, copy=False) for name, array in feeds.items()}
        ran = session.run(cast).items()
        if served != network:  # the plain UNet's call run on unet_cache: its feature is not asked for
            ran = [(name, value) for name, value in ran if name != FEATURE]
        outputs = {name: value.astype(np.float32, copy=False) for name, value in ran}
        for name, value in outputs.items():
            if not np.isfinite(value.sum(dtype=np.float64)):  # one pass: NaN and inf survive a float64 sum
                raise InvalidInputError(f"{network} produced NaN/inf in {name!r}: {_blame(feeds, self.loras)}")
        return outputs

    def run(self, network: str, **feeds: np.ndarray) -> np.ndarray:
        """Run a one-output network."""
        (output,) = self.run_all(network, **feeds).values()
        return output

    def close(self) -> None:
        self.artifact.close()

    # ----------------------------------------------------------------------------------------------
    # LoRA adapters (documented on Pipeline.load_lora and friends)

    @property
    def loras(self) -> dict[str, float]:
        return {name: scale for name, (_, scale) in self._loras.items()}

    def load_lora(self, path: str | os.PathLike[str], name: str | None, scale: float) -> str:
        name = Path(path).stem if name is None else name
        if name in self._loras:
            raise InvalidInputError(f"a LoRA named {name!r} is loaded already: unload it first or pass another name")
        _check_lora_scale(scale)
        maps = self.artifact.weight_maps()
        if not maps:
            folder = self.artifact.folder
            rebuild = rebuild_command(folder, self.artifact.manifest.source.get("path"))
            raise InvalidInputError(
                f"{folder} has no weight maps, which LoRA needs: re-export it with this sdtrt (`{rebuild}`)"
            )
        adapter = read_lora(path, maps)
        self._set_loras({**self._loras, name: (adapter, float(scale))})
        log.info("LoRA %s: %d layers at scale %g", name, adapter.size, scale)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        self._check_lora_name(name)
        _check_lora_scale(scale)
        self._set_loras({**self._loras, name: (self._loras[name][0], float(scale))})

    def unload_lora(self, name: str | None) -> None:
        if name is not None:
            self._check_lora_name(name)
        self._set_loras({} if name is None else {k: v for k, v in self._loras.items() if k != name})

    def _check_lora_name(self, name: str) -> None:
        if name not in self._loras:
            raise InvalidInputError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._loras) or 'none'})")

    def _set_loras(self, loras: dict[str, tuple[LoraAdapter, float]]) -> None:
        """Compose the weights of every open session for ``loras`` from the base and hand them over
        (a session whose weights stay the base ones does nothing)."""
        adapters = list(loras.values())
        adapted = {  # all of them first: weights that do not compose change no session
            network: adapt(self.artifact.session(network), weight_map, NETWORK_FACTS[network].lora_component, adapters)
            for network, weight_map in self.artifact.weight_maps().items()  # unet_controlnet: unet's component
            if self.artifact.is_open(network)
        }
        for network, weights in adapted.items():
            weights.give(self.artifact.session(network))
        self._loras = loras


def _check_lora_scale(scale: float) -> None:
    if not is_real(scale) or not math.isfinite(scale):
        raise InvalidInputError(f"a LoRA scale must be a finite number, got {scale!r}")


def _blame(feeds: dict[str, np.ndarray], loras: dict[str, float]) -> str:
    """What most likely made a network's output non-finite (looked for only once it is)."""
    for name, array in feeds.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"its input {name!r} holds NaN/inf"
    if loras:
        adapters = ", ".join(f"{name} at {scale:g}" for name, scale in loras.items())
        return f"its inputs are finite: the LoRA adapters ({adapters}) make its weights overflow; lower their scales"
    return "its inputs are finite: the export's weights overflow or are corrupt (re-export the model)"
