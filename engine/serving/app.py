"""The OpenAI-compatible HTTP API (FastAPI) in front of an :class:`EngineLoop`.

Handlers run on the event loop; they tokenize, build sequences whose sinks hand each step's output
back to the loop (``engine.serving.delivery``: one wake-up a step), and submit them to the engine thread. A stream that the
client drops, or a plain request whose client disconnects, aborts its sequences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from engine.serving.delivery import LoopDelivery
from engine.serving.loop import EngineLoop, NotReady
from engine.serving.metrics import ServerMetrics
from engine.serving.middleware import ADMISSION, RECEIVED, AuthAndCount
from engine.serving.protocol import ChatRequest, CompletionRequest, error_body
from engine.serving.reply import Reply
from engine.serving.scheduler import QueueFull
from engine.serving.sequence import Sequence
from engine.serving.tools import ToolCallStream

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a plain (non-streamed) request checks its client
# a request with at most this much text is rendered and tokenized on the event loop (a 1,980-character chat
# took 0.72 ms with SmolLM2's template and tokenizer on the 2-core machine; token ids take 5 us)
INLINE_TEXT_CHARS = 500


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    return error(503, message, "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


class Api:
    """The endpoints' logic over one engine loop (the route functions in ``create_app`` call these)."""

    def __init__(self, loop: EngineLoop, model_name: str, metrics: ServerMetrics,
                 sampling: dict | None = None) -> None:
        self.loop, self.model_name, self.metrics = loop, model_name, metrics
        self.sampling = sampling or {}  # the model's defaults for fields a request leaves out
        self.delivery: LoopDelivery | None = None  # outputs to the event loop, one wake-up a step

    def health(self) -> JSONResponse:
        if self.loop.error is not None:
            return JSONResponse({"status": "error", "message": str(self.loop.error)}, status_code=503)
        if not self.loop.ready.is_set():  # "loading", then "warming up" (engine.serving.warmup)
            return JSONResponse({"status": self.loop.phase}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "model": self.model_name})

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "layerstream"}
        if self.loop.engine is not None:
            card["max_model_len"] = self.loop.engine.opts.max_context
        return {"object": "list", "data": [card]}

    async def complete(self, request: Request, body: ChatRequest | CompletionRequest, chat: bool):
        """Check, tokenize and submit; answer with a stream, the full response or an error envelope."""
        loop = self.loop
        if body.model is not None and body.model != self.model_name:
            return error(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r} "
                         "(GET /v1/models)", param="model", code="model_not_found")
        if not loop.ready.is_set() or loop.engine is None:
            return unavailable(f"the model is still {loop.phase}; retry shortly")
        queue: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        if self.delivery is None or self.delivery.aio is not aio:
            self.delivery = LoopDelivery(aio)
        reply = Reply(chat, self.model_name, loop.engine.tokenizer)
        try:
            with loop.admitting():  # an idle engine's first pass waits for a request still on its way in
                try:
                    prompts, seqs = await self._admit(body, chat, reply, queue, request.scope.get(RECEIVED))
                finally:  # submitted (or refused): the middleware's hold ends here, not with the response
                    if (release := request.scope.get(ADMISSION)) is not None:
                        release()
        except QueueFull as e:
            return unavailable(f"server overloaded: {e}")
        except NotReady as e:
            return unavailable(str(e))
        except ValueError as e:  # a FieldError names its field
            return error(400, str(e), param=getattr(e, "param", None))
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return StreamingResponse(self.stream(seqs, queue, reply, body.include_usage, prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.collect(request, seqs, queue, reply, prompt_tokens)

    async def _admit(self, body: ChatRequest | CompletionRequest, chat: bool, reply: Reply,
                     queue: asyncio.Queue, received: float | None = None) -> tuple[list[list[int]], list[Sequence]]:
        """Tokenize (a long text off the event loop: it takes a while), build the sequences and submit them:
        (the prompts' ids, the sequences); ValueError, QueueFull or NotReady as ``EngineLoop.submit`` raises."""
        loop = self.loop
        tok = loop.engine.tokenizer
        # a long text off the event loop; token ids or a short text here, without the thread's hop
        prompts = body.prompts(tok) if body.text_chars() <= INLINE_TEXT_CHARS else \
            await asyncio.to_thread(body.prompts, tok)
        reply.tools = chat and body.tools_used
        reply.max_calls = 1 if chat and body.parallel_tool_calls is False else None
        seqs = []
        for p, ids in enumerate(prompts):  # choice index p * n + i, as OpenAI numbers a batch; seeded by i
            params = body.sampling(body.token_limit or max(1, loop.engine.opts.max_context - len(ids)), self.sampling)
            seqs += [Sequence(ids, params, loop.engine.tokenizer, index=p * params.n + i, request_id=reply.id,
                              sink=self.delivery.sink(queue), choice=i)
                     for i in range(params.n)]
        if received is not None:  # the step log's received_s (else each sequence's arrival)
            for s in seqs:
                s.received = received
        loop.submit(seqs)
        return prompts, seqs

    async def collect(self, request: Request, seqs: list[Sequence], queue: asyncio.Queue, reply: Reply,
                      prompt_tokens: int):
        """Wait for every choice (cancelling them if the client goes away); the full response."""
        done, checked = 0, time.monotonic()
        try:
            while done < len(seqs):
                if time.monotonic() - checked > DISCONNECT_POLL_S:  # outputs may arrive every step: poll anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        log.info("client of %s went away; cancelling", reply.id)
                        return Response(status_code=499)
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if out.finished:
                    done += 1
                    self._observe_first(out.seq)
        finally:
            self._abort_unfinished(seqs)
        failed = next((s.error for s in seqs if s.error), None)
        if failed:
            return error(500, failed, "server_error", code="nonfinite_logits")
        if any(s.finish_reason == "abort" for s in seqs):
            return error(503, "the request was cancelled (the server is shutting down or a step failed)",
                         "service_unavailable")
        return reply.full(seqs, prompt_tokens)

    async def stream(self, seqs: list[Sequence], queue: asyncio.Queue, reply: Reply, include_usage: bool,
                     prompt_tokens: int):
        """Server-sent events: a chunk per step's text, one per finish, the usage, then ``[DONE]``."""
        done = 0
        calls = {s.index: ToolCallStream(max_calls=reply.max_calls) for s in seqs} if reply.tools else {}
        try:
            if reply.chat:
                for s in seqs:
                    yield _sse(reply.chunk(s.index, None, None, first=True, with_usage=include_usage))
            while done < len(seqs):
                out = await queue.get()
                i, text, sent = out.seq.index, out.text, len(calls[out.seq.index].calls) if calls else 0
                if calls:  # text that may be a call is held until it is one (or is not)
                    text = calls[i].feed(text or "") + (calls[i].finish() if out.finished else "")
                new = [(k, c) for k, c in enumerate(calls[i].calls) if k >= sent] if calls else None
                if text or out.logprobs or new:  # a token's logprobs go out even while its text is held back
                    yield _sse(reply.chunk(i, text, None, with_usage=include_usage, logprobs=out.logprobs,
                                           tool_calls=new))
                if out.finished:
                    done += 1
                    self._observe_first(out.seq)
                    reason = reply.finish_reason(out.finish_reason, bool(calls and calls[i].calls))
                    yield _sse(reply.chunk(i, None, reason, with_usage=include_usage))
                    if out.seq.error:  # the stream has begun (status 200): the error goes in it, as OpenAI's do
                        yield _sse(error_body(out.seq.error, "server_error", code="nonfinite_logits"))
            if include_usage:
                yield _sse(reply.usage_chunk(seqs, prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the stream ended
            self._abort_unfinished(seqs)

    def _abort_unfinished(self, seqs: list[Sequence]) -> None:
        left = [s.seq_id for s in seqs if not s.finished]
        if left:
            self.loop.abort(left)

    def _observe_first(self, seq: Sequence) -> None:
        if seq.first_token_time is not None:
            self.metrics.ttft.observe(seq.first_token_time - seq.arrival)


def _field_error(errors: list) -> JSONResponse:
    """400 in OpenAI's envelope naming the first bad field of pydantic's ``errors``."""
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return error(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param=param)


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request's JSON object as ``model``, or an error response saying what is wrong with the body.
    The Content-Type must be JSON: a web page on any site may send a plain-text or form POST here
    without asking first (a CORS "simple request"), and such a body must not start a generation."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return error(415, f"send the body as JSON with the header Content-Type: application/json (curl: -H "
                     f"'Content-Type: application/json'); got {media or 'no Content-Type'}")
    raw = await request.body()
    if not raw.strip():
        return error(400, "the body is empty; send a JSON object")
    try:
        obj = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8 / 16 / 32
        return error(400, f"the body is not valid JSON ({e}); send a JSON object")
    if not isinstance(obj, dict):
        return error(400, f"the body must be a JSON object, got {type(obj).__name__ if obj is not None else 'null'}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        return _field_error(e.errors())


def internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A failure of ours while answering (logged): 500 in OpenAI's envelope rather than a bare text body."""
    log.error("internal error while answering a request", exc_info=exc)
    return error(500, f"internal server error ({type(exc).__name__}); the server keeps serving", "server_error")


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None,
               metrics: ServerMetrics | None = None, sampling: dict | None = None,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The app; ``loop`` is started (and stopped) by the caller. ``sampling``: the values of sampling fields a
    request leaves out (``engine.generation_defaults``; OpenAI's for the rest). ``allowed_origins``: web
    origins whose pages may call the API (CORS, Starlette's middleware; none by default)."""
    app = FastAPI(title="layerstream", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics or ServerMetrics(loop)
    api = Api(loop, model_name, metrics, sampling)
    app.add_middleware(AuthAndCount, api_key=api_key, metrics=metrics, hold=loop.hold_admission)
    if allowed_origins:  # added last, so outermost: a preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(HTTPException, lambda _, exc: error(exc.status_code, str(exc.detail),
                                                                  code=str(exc.status_code)))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        return api.health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error(404, f"model {model_id!r} does not exist; this server serves {model_name!r}",
                         param="model", code="model_not_found")
        return api.models()["data"][0]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatRequest)
        return body if isinstance(body, JSONResponse) else await api.complete(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        return body if isinstance(body, JSONResponse) else await api.complete(request, body, chat=False)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
