"""One HTTP request to an ASGI app in this process, its response streamed as it is produced.

A cluster replica serves its fleet's whole OpenAI app (validation, streaming, errors, metrics)
without a socket: the ingress forwards the request's method, path, body and headers, and
`call_asgi` drives the app directly, yielding `(status, headers)` first and then each body chunk
as the app sends it (SSE streams stay streams). If the caller stops reading, the app sees the
client disconnect, as it would over a socket, and aborts the request.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


async def call_asgi(app, method: str, path: str, body: bytes = b"",
                    headers: list[tuple[str, str]] = ()) -> AsyncIterator:
    """Yields (status, [(name, value), ...]) once, then the body's chunks (bytes)."""
    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method.upper(),
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()     # the caller stopped reading (or the response ended): let the app finish
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=30)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
