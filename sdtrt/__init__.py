"""sdtrt: Stable Diffusion inference on ONNX Runtime and TensorRT with a lean NumPy runtime.

from sdtrt import Pipeline
pipe = Pipeline.load("artifacts/sd15")
pipe.txt2img("an astronaut riding a horse", seed=42).images[0].save("out.png")

The public names load on first access (PEP 562), so importing a subpackage such as sdtrt.engine
does not pull in the runtime's pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdtrt.engine.version import VERSION

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports them
    from sdtrt.engine.errors import SdtrtError
    from sdtrt.runtime.pipeline import GenerationResult, Pipeline

__version__ = VERSION

_LAZY = {
    "GenerationResult": "sdtrt.runtime.pipeline",
    "Pipeline": "sdtrt.runtime.pipeline",
    "SdtrtError": "sdtrt.engine.errors",
}

__all__ = ["GenerationResult", "Pipeline", "SdtrtError", "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
