"""The errors sdtrt raises for things a user can fix. Each carries one clear line of text.

Also how the backends' own errors are recognized, so that each becomes one of these.
"""

import re

# what ONNX Runtime, OpenVINO and CUDA say when an allocation fails
ALLOCATION_FAILURE = re.compile(
    r"bad[_ ]alloc|fail\w* to allocate|allocation fail|out of memory|cannot allocate|ALLOC_FAILED|MemoryAllocation",
    re.IGNORECASE,
)


def is_backend_error(exc: BaseException) -> bool:
    """Whether a backend's runtime raised ``exc``: ONNX Runtime's own exception types (none of them a
    RuntimeError), OpenVINO's, TensorRT's and CUDA's RuntimeError."""
    return isinstance(exc, RuntimeError) or type(exc).__module__.startswith(("onnxruntime", "openvino"))


class SdtrtError(Exception):
    """Base class: a problem with the user's input, files or machine, stated in one line."""


class InvalidInputError(SdtrtError, ValueError):
    """A request the engine cannot serve as asked (size, steps, guidance, scheduler, ...)."""


class ManifestError(SdtrtError):
    """An artifact folder whose manifest is missing, corrupt or of an unsupported version."""


class BackendUnavailableError(SdtrtError):
    """An explicitly requested backend whose package, device or engines are missing."""


class ExportError(SdtrtError):
    """A model that cannot be exported (unsupported family, missing component, ...)."""
