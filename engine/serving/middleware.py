"""The server's ASGI middleware: the API key on /v1/ paths, a request count by status, and a completion request's
hold on an idle engine's gather window from its first byte (engine.serving.loop.EngineLoop.hold_admission)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.responses import JSONResponse

from engine.serving.metrics import ServerMetrics
from engine.serving.protocol import error_body

ADMITTED_PATHS = ("/v1/completions", "/v1/chat/completions")  # requests that submit sequences
ADMISSION = "layerstream.admission"  # the scope key of the middleware's hold on the gather window (or None)
RECEIVED = "layerstream.received"  # the scope key of when the request reached the app (time.monotonic())


class AuthAndCount:
    """ASGI middleware: the API key on /v1/ paths, and a request count by status. (A plain ASGI class, not
    Starlette's BaseHTTPMiddleware, which hides the client's disconnect from the endpoint.)"""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics,
                 hold: Callable[[], Callable[[], None]] | None = None) -> None:
        self.app, self.api_key, self.metrics, self.hold = app, api_key, metrics, hold

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        scope[RECEIVED] = time.monotonic()
        status = [500]

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        # a completion request holds an idle engine's gather window open from here (its body read and parsed)
        # until its sequences are submitted (Api.complete releases it then), or until it is answered
        release = self.hold() if self.hold is not None and path in ADMITTED_PATHS else None
        scope[ADMISSION] = release
        try:
            await self._call(scope, receive, send_counting)
        finally:
            if release is not None:
                release()
        self.metrics.requests.labels(path, str(status[0])).inc()

    async def _call(self, scope, receive, send_counting) -> None:
        headers = dict(scope.get("headers") or [])
        if self.api_key and headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
            message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
            response = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)
            await response(scope, receive, send_counting)
        else:
            await self.app(scope, receive, send_counting)
