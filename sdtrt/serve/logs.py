"""Every log line of the server carries the id of the request it is about (``-`` where none)."""

from __future__ import annotations

import contextvars
import logging

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sdtrt_request_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's, from the context) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with request ids: the root logger's handler formats and filters every record."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("sdtrt", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
