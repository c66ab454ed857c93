"""An fp16 session guarded by its fp32 twin: NaN/inf outputs are recomputed at fp32."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.session import Session

log = logging.getLogger(__name__)


class Fp32Fallback:
    """An fp16 session whose non-finite outputs are recomputed by its fp32 twin (opened on first need).

    Stable Diffusion 1.x VAE decoders overflow in fp16 on some latents; the NaN that follows would
    become a black image. Here it becomes a warning (once) and an fp32 run of the same inputs. An
    export without the fp32 variant, or an fp32 run that is not finite either, is an error.
    """

    def __init__(self, primary: Session, open_fp32: Callable[[], Session] | None, name: str) -> None:
        self.name = name
        self.inputs = primary.inputs
        self.outputs = primary.outputs
        self._primary = primary
        self._open_fp32 = open_fp32
        self._fp32: Session | None = None
        self._warned = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._primary.run(feeds)
        if _finite(outputs):
            return outputs
        if not self._warned:
            log.warning("%s produced NaN/inf at fp16 (an fp16 overflow); re-running it at fp32", self.name)
            self._warned = True
        if self._open_fp32 is None:
            raise ManifestError(
                f"{self.name} produced NaN/inf at fp16 and this export has no fp32 {self.name} to fall back to: "
                "re-export with --precision fp32 fp16"
            )
        if self._fp32 is None:
            self._fp32 = self._open_fp32()
        cast = {n: np.asarray(a).astype(self._fp32.inputs[n].dtype, copy=False) for n, a in feeds.items()}
        exact = self._fp32.run(cast)
        if not _finite(exact):
            raise InvalidInputError(f"{self.name}: the output is not finite at fp32 either: its inputs hold NaN/inf")
        return {n: a.astype(self.outputs[n].dtype, copy=False) for n, a in exact.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Only the base weights: the networks this wraps (the VAE decoder) have no weight map."""
        if weights:
            raise InvalidInputError(f"{self.name} has no weight map: its weights cannot be changed")

    def close(self) -> None:
        self._primary.close()
        if self._fp32 is not None:
            self._fp32.close()
            self._fp32 = None


def _finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
