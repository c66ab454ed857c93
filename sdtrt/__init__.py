"""sdtrt: Stable Diffusion inference on ONNX Runtime and TensorRT with a lean NumPy runtime."""

__version__ = "0.1.0"
