"""The engine's one doorway: an artifact folder opened on one backend.

``open_artifact(folder, backend)`` reads and validates the manifest, takes a cheap look at the files
it names (sizes, ONNX headers), chooses the backend, and returns an Artifact that owns everything
the engine decides for the runtime: which ONNX variant each network runs at, its weight map (read
once, shared by the session and LoRA), and its session (opened on first use, its inputs and outputs
checked against the manifest's, closed with the artifact). The runtime asks the artifact for a
network's inputs, weights and session, and never which backend ran. Whatever fails to load is one
ManifestError naming the file and the command that rebuilds the export.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdtrt.engine.backends import (
    BackendChoice,
    SessionTarget,
    choose_backend,
    component_fused,
    component_precision,
    open_session,
)
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.manifest import ComponentFile, Manifest, load_manifest
from sdtrt.engine.network_facts import LORA_NETWORKS
from sdtrt.engine.session import Session, TensorSpec
from sdtrt.engine.weights import WeightMap, load_weight_map

log = logging.getLogger(__name__)


class Artifact:
    """An export opened on a backend: manifest, per-network precision, weight maps and sessions."""

    def __init__(self, folder: Path, manifest: Manifest, backend: BackendChoice) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self._precisions: dict[str, str] = {}
        self._fused: dict[str, bool] = {}
        self._weight_maps: dict[str, WeightMap | None] = {}
        self._sessions: dict[str, Session] = {}

    def __contains__(self, network: str) -> bool:
        return network in self.manifest.components

    def precision(self, network: str) -> str:
        """The ONNX variant ``network`` runs at on this backend, chosen (and logged) once."""
        if network not in self._precisions:
            self._precisions[network] = component_precision(self.backend, self.manifest, network)
        return self._precisions[network]

    def fused(self, network: str) -> bool:
        """Whether ``network`` runs ONNX Runtime's fused graph on this backend, chosen (and logged) once."""
        if network not in self._fused:
            self._fused[network] = component_fused(self.backend, self.manifest, network, self.precision(network))
        return self._fused[network]

    def file(self, network: str) -> ComponentFile:
        """The ONNX file ``network`` runs from on this backend."""
        return self.manifest.component_file(network, self.precision(network), self.fused(network))

    def inputs(self, network: str) -> dict[str, TensorSpec]:
        """The network's inputs as the manifest declares them (no session is opened)."""
        return {spec.name: spec for spec in self.file(network).inputs}

    def weight_map(self, network: str) -> WeightMap | None:
        """The changeable weights of ``network`` (LoRA), read once; None where it has none."""
        if network not in self._weight_maps:
            file = self.file(network)
            try:
                weights = None if file.weights is None else load_weight_map(self.folder / file.weights)
            except ManifestError as exc:  # missing or corrupt: say how to rebuild the export
                raise self.manifest.damaged(self.folder, str(exc)) from exc
            self._weight_maps[network] = weights
        return self._weight_maps[network]

    def weight_maps(self) -> dict[str, WeightMap]:
        """The weight maps of every network of this export that LoRA may change.

        LoRA asks for them: a network running a fused graph (which has no weight map: ORT's fusions pack and
        transpose weights) switches to its plain graph, closing the fused session where it is open.
        """
        for network in LORA_NETWORKS:
            if network in self and self.fused(network):
                log.info("%s: LoRA runs the plain graph (ONNX Runtime's fused one has no weight map)", network)
                self._fused[network] = False
                self._weight_maps.pop(network, None)
                if (session := self._sessions.pop(network, None)) is not None:
                    session.close()
        if int8 := [network for network in LORA_NETWORKS if network in self and self.runs_int8(network)]:
            raise InvalidInputError(
                f"LoRA cannot change {', '.join(int8)} of {self.folder} at --precision int8 (their weights are "
                "quantized): load it at --precision bf16 or fp32 to use LoRA"
            )
        maps = {network: self.weight_map(network) for network in LORA_NETWORKS if network in self}
        return {network: weight_map for network, weight_map in maps.items() if weight_map is not None}

    def runs_int8(self, network: str) -> bool:
        """Whether ``network`` runs its int8 network (`sdtrt quantize --int8`) on this backend."""
        component = self.manifest.components[network]
        return self.backend.compute == "int8" and "int8" in component.int8_files(self.backend.kind)

    def session(self, network: str) -> Session:
        """The session of ``network``, opened on first use."""
        if network not in self._sessions:
            precision, weight_map = self.precision(network), self.weight_map(network)
            target = SessionTarget(
                self.folder, self.manifest, network, precision, weight_map, fused=self.fused(network)
            )
            self._sessions[network] = open_session(self.backend, target)
        return self._sessions[network]

    def is_open(self, network: str) -> bool:
        return network in self._sessions

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_artifact(folder: str | os.PathLike[str], backend: str = "auto", precision: str | None = None) -> Artifact:
    """Open an artifact folder written by ``sdtrt export``; ``backend`` is "auto" or a name in BACKENDS,
    ``precision`` the arithmetic precision where the backend offers a choice (openvino: "bf16", "fp32", or "int8";
    ort-cpu: "fp32" or "int8"; int8 where `sdtrt quantize --int8` made int8 networks for that backend: one clear
    error where it did not)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    kinds = ("openvino", "ort-cpu") if backend == "auto" else (backend,)
    if precision == "int8" and not any(c.int8_files(kind) for kind in kinds for c in manifest.components.values()):
        raise InvalidInputError(
            f"{folder} has no int8 networks{'' if backend == 'auto' else f' for {backend}'}: make them with "
            f"`sdtrt quantize {folder} --int8`, or run at bf16 or fp32"
        )
    return Artifact(folder, manifest, choose_backend(backend, compute=precision))
