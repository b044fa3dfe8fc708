"""The HTTP side of `mlx-mobilellm server`: a Starlette app that checks the API key and the body
size, hands jobs to the generation worker and answers as OpenAI does, whole or as server-sent
events (`data: {...}` chunks, then `data: [DONE]`).

Requests wait on the worker through an asyncio queue that the worker thread fills; a client
that disconnects (mid-stream, or while waiting for a whole answer) cancels its job, which frees
its place in the batch.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from typing import Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .completions import Served, dumps, prepare_chat, prepare_completion
from .protocol import APIError, parse_body
from .worker import Failed, Finished, Job, Token, Worker

MAX_BODY_BYTES = 8 << 20
"""Long enough for a prompt filling a 128k-token context several times over."""
DISCONNECT_POLL_SECONDS = 0.25


def create_app(served: Served, worker: Worker, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    created = int(time.time())

    def authorised(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key is not None and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           kind="invalid_request_error", code="invalid_api_key")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        authorised(request)
        return JSONResponse({"object": "list", "data": [
            {"id": served.model_id, "object": "model", "created": created,
             "owned_by": "mlx-mobilellm"}]})

    def endpoint(prepare: Callable) -> Callable:
        async def handle(request: Request) -> Response:
            authorised(request)
            body = parse_body(await _read_body(request, max_body_bytes))
            # Templates, tokenizers and schema compilation take milliseconds to a second: off
            # the event loop, so that other requests keep streaming meanwhile.
            fields, reply = await run_in_threadpool(prepare, served, body)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            job = Job(emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      **fields)
            worker.submit(job)
            if reply.sampling.stream:
                return StreamingResponse(_stream(job, reply, events),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _whole(request, job, reply, events)
        return handle

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/chat/completions", endpoint(prepare_chat), methods=["POST"]),
                Route("/v1/completions", endpoint(prepare_completion), methods=["POST"])],
        exception_handlers={APIError: _api_error, HTTPException: _http_error,
                            Exception: _server_error},
        lifespan=lifespan)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is over the limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _api_error(request: Request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _server_error(request: Request, error: Exception) -> Response:
    """A bug: said in OpenAI's shape too (Starlette logs the traceback)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return JSONResponse(APIError(500, message, kind="server_error").body(), status_code=500)


async def _http_error(request: Request, error: HTTPException) -> Response:
    return JSONResponse(APIError(error.status_code, error.detail).body(),
                        status_code=error.status_code)


async def _whole(request: Request, job: Job, reply, events: asyncio.Queue) -> Response:
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return Response(status_code=499)  # nobody reads it; nginx's "client closed"
            continue
        if isinstance(event, Token):
            reply.add(event)
        elif isinstance(event, Finished):
            reply.finished = event
            return JSONResponse(reply.whole())
        else:
            return JSONResponse(APIError(500, event.message, kind="server_error").body(),
                                status_code=500)


async def _stream(job: Job, reply, events: asyncio.Queue):
    try:
        for chunk in reply.first_chunks():
            yield _event(chunk)
        while True:
            event = await events.get()
            if isinstance(event, Token):
                for chunk in reply.chunks_for(event):
                    yield _event(chunk)
                continue
            if isinstance(event, Finished):
                for chunk in reply.last_chunks(event):
                    yield _event(chunk)
            elif isinstance(event, Failed):
                yield _event(APIError(500, event.message, kind="server_error").body())
            yield "data: [DONE]\n\n"
            return
    finally:  # finished, or the client went away (Starlette cancels the stream)
        job.cancelled.set()


def _event(chunk: dict) -> str:
    return f"data: {dumps(chunk)}\n\n"
