"""The errors sdtrt raises for things a user can fix. Each carries one clear line of text."""


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
