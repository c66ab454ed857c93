"""The libraries' own chatter (diffusers, transformers, the hub client: their log lines and Python warnings),
held back while sdtrt works with them.

Loading the wrong kind of model makes diffusers print pages of warnings before the error that sdtrt turns into
its one line. Inside ``held_back()`` they are collected instead: when the work succeeds they are shown as they
would have been, when it fails they go to sdtrt's debug log only (``sdtrt -v``), and the user sees the one line.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator

log = logging.getLogger(__name__)

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate")
CONFIGURED = ("diffusers", "transformers")  # those that give their loggers a handler of their own


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Collect the libraries' log records and warnings in the block; show them after it unless it raised."""
    for name in CONFIGURED:  # their own handler, added on first use, would print past the one swapped in here
        with contextlib.suppress(ImportError):
            importlib.import_module(f"{name}.utils.logging").get_logger(name)
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [collect], False
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters stay: what would show is caught
            try:
                yield
            finally:
                for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
                    logger.handlers, logger.propagate = handlers, propagate
    except BaseException:
        for record in collect.records:
            log.debug("held back from %s: %s", record.name, record.getMessage())
        for warning in caught:
            log.debug("held back: %s: %s", warning.category.__name__, warning.message)
        raise
    for record in collect.records:
        logging.getLogger(record.name).handle(record)
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
