"""The errors sdtrt raises for things a user can fix. Each carries one clear line of text.

Also what the backends say when memory runs out (engine/backends.py recognizes their errors).
"""

import re

# what ONNX Runtime, OpenVINO and CUDA say when an allocation fails
ALLOCATION_FAILURE = re.compile(
    r"bad[_ ]alloc|fail\w* to allocate|allocation fail|out of memory|cannot allocate|ALLOC_FAILED|MemoryAllocation",
    re.IGNORECASE,
)


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
