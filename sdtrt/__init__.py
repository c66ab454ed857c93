"""sdtrt: Stable Diffusion inference on ONNX Runtime and TensorRT with a lean NumPy runtime.

from sdtrt import Pipeline
pipe = Pipeline.load("artifacts/sd15")
pipe.txt2img("an astronaut riding a horse", seed=42).images[0].save("out.png")
"""

__version__ = "0.1.0"

from sdtrt.engine.errors import SdtrtError
from sdtrt.runtime.pipeline import GenerationResult, Pipeline

__all__ = ["GenerationResult", "Pipeline", "SdtrtError", "__version__"]
