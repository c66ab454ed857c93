"""The one shape of every error a client sees: a status, a kind, one line of text; never a traceback.

The body is OpenAI's error shape, ``{"error": {"message": ..., "type": KIND, "code": STATUS}}``, which
OpenAI clients read, for every route.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# kind -> HTTP status
KINDS = {
    "invalid_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,  # with an Allow header
    "too_large": 413,
    "queue_full": 429,
    "internal": 500,
    "unavailable": 503,
    "deadline": 504,
    "cancelled": 499,  # the client went away (nginx's code); nobody reads this answer
}


class ApiError(Exception):
    """An error answered as JSON: ``kind`` (a key of KINDS) and one line of ``message``."""

    def __init__(self, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = KINDS[kind]
        self.message = " ".join(message.split())
        self.headers = headers or {}

    def response(self, request_id: str | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "code": self.status}}
        if request_id:
            body["error"]["request_id"] = request_id
        return JSONResponse(body, status_code=self.status, headers=self.headers)
