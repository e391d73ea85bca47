"""Error responses of the control API: `{"error": {"kind", "message"}}` with the status code
of the error's kind, for every error, whether a handler raised it, aiohttp's router refused
the request, or aiohttp's HTTP parser did (orchestrator.api.connections).

Used by orchestrator.api.server (its middleware), .inputs and .events (ApiError),
.connections (error_body for the parser's refusals and the connection cap's 503).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ..errors import OrchestratorError, http_status

logger = logging.getLogger(__name__)


AIOHTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 413: "TooLarge"}


class ApiError(Exception):
    """A refusal with its HTTP status and kind; the message says what to do."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"kind": kind, "message": message}}).encode()  # ASCII: always encodable


def error_response(status: int, kind: str, message: str) -> web.Response:
    return web.Response(body=error_body(kind, message), status=status, content_type="application/json")


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as error:
        response = error_response(error.status, error.kind, str(error))
        if error.status == 408:  # the rest of the body may still come: do not read it
            response.force_close()
        return response
    except web.HTTPException as error:  # aiohttp's own: 404 route, 405, 413 ...
        kind = AIOHTTP_KINDS.get(error.status, type(error).__name__)
        response = error_response(error.status, kind, error.reason or str(error))
        if "Allow" in error.headers:
            response.headers["Allow"] = error.headers["Allow"]
        return response
    except OrchestratorError as error:
        status = http_status(error)
        if status == 500:
            logger.error("%s %s failed", request.method, request.path, exc_info=error)
        return error_response(status, type(error).__name__, " ".join(str(error).split()))
