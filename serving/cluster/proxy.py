"""The cluster's one OpenAI-compatible front door: routes each request by model name to the replica
that hosts the model and streams its response back unchanged.

Each replica runs a device group's fleet behind the same OpenAI app a single-process server runs
(`serving.http.api_server`), so validation, errors, streaming and usage are the replica's own; the
proxy only reads the body's `model`, picks the replica (`Routes.pick`, by the placement's weights
where a model has several), forwards the request (`forward(replica, method, path, body, headers)`,
an async iterator of `(status, headers)` then body chunks: a Ray Serve handle call in production)
and merges what describes the whole cluster: `/v1/models` (every replica's models), `/health`
(every replica's, 503 if any is not ok) and `/metrics` (every replica's metrics, each sample
labelled `replica="<name>"`). A model that no replica hosts is a 404 naming the served ones; one the
placement could not fit anywhere is a 503 saying why. Nothing reaches the client before the
replica's first token (or whole body, unstreamed), so a replica that fails before (its actor or
node is gone) has sent nothing and the request goes to another replica of the model; while the
model has none (being moved, or placed again after a loss; `Routes`), the request waits for one, up
to a hold time, then is a 503. A replica that fails mid-stream ends the stream with an explicit
error event. `/tokenize` and `/detokenize` are routed the same way (not counted as arrivals). The
proxy also records arrivals per model (a `RatesMonitor`) and counts each replica's requests in
flight, which is what the cluster controller watches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.scheduling.replan import RatesMonitor

log = logging.getLogger("fineserve.proxy")

Forward = Callable[[str, str, str, bytes, list], AsyncIterator]
PASSED_HEADERS = ("content-type", "retry-after", "x-request-id", "x-fineserve-ignored-fields")
HOLD_S = 120.0        # how long a request waits for a replica of a model that has none up
HOLD_POLL_S = 0.05


@dataclass
class Routes:
    """Which replicas host each model, with the placement's weights; models it could not place. A
    model listed with no replica is being moved: its requests wait at the proxy (up to its hold
    time) for the replica that will host it. `inflight` counts the requests each replica is
    answering (what a drain waits for)."""
    replicas: dict[str, dict[str, float]]                 # model -> {replica: weight}
    unplaced: dict[str, str] = field(default_factory=dict)   # model -> why it is not served
    rng: random.Random = field(default_factory=random.Random)
    inflight: Counter = field(default_factory=Counter)
    closing: bool = False                                  # shutting down: new requests are refused
    _lost: dict[str, asyncio.Event] = field(default_factory=dict, repr=False)

    @property
    def replica_names(self) -> list[str]:
        return sorted({r for hosts in self.replicas.values() for r in hosts})

    def update(self, replicas: dict[str, dict[str, float]], unplaced: dict[str, str], lost=()) -> None:
        """Route by a new plan from now on (requests already answering stay where they are, but on a
        `lost` replica, whose node is gone, every request still waiting on it fails at once)."""
        self.replicas, self.unplaced = replicas, unplaced
        for replica in lost:
            self.lost_signal(replica).set()

    def lost_signal(self, replica: str) -> asyncio.Event:
        return self._lost.setdefault(replica, asyncio.Event())

    def pick(self, model: str, exclude: set[str] = frozenset()) -> str | None:
        """A replica hosting `model` (by weight), none of `exclude`; None when there is none left."""
        hosts = {n: w for n, w in self.replicas.get(model, {}).items() if n not in exclude}
        if not hosts:
            return None
        names = list(hosts)
        return names[0] if len(names) == 1 else self.rng.choices(names, weights=[hosts[n] or 1e-9 for n in names])[0]


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    type_ = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers={"Retry-After": "5"} if status == 503 else None)


async def _collect(stream: AsyncIterator) -> tuple[int, dict, bytes]:
    status, headers, chunks = None, {}, []
    async for item in stream:
        if status is None:
            status, headers = item[0], dict(item[1])
        else:
            chunks.append(item)
    return status, headers, b"".join(chunks)


async def _until_lost(stream: AsyncIterator, lost: asyncio.Event) -> AsyncIterator:
    """The replica's items, but a ConnectionError as soon as the replica is declared lost while an
    item is awaited: a request queued for a replica whose node died would otherwise wait forever."""
    waiter = asyncio.ensure_future(lost.wait())
    try:
        while True:
            item = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({item, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if item not in done:
                item.cancel()
                raise ConnectionError("the replica was lost with its node")
            try:
                yield item.result()
            except StopAsyncIteration:
                return
    finally:
        waiter.cancel()


async def _answer_start(stream: AsyncIterator) -> tuple[int, list, bool, list[bytes]]:
    """A replica's status, headers, whether it streams (SSE), and what the client may have first: an
    SSE stream's first event (its first token) or a whole body. Nothing reaches the client before,
    so a replica that fails until then has sent nothing and the request can go elsewhere."""
    status, headers = await anext(stream)
    sse = dict(headers).get("content-type", "").startswith("text/event-stream")
    if not sse:
        return status, headers, sse, [chunk async for chunk in stream]
    first = await anext(stream, None)
    return status, headers, sse, [] if first is None else [first]


async def _ended_explicitly(stream: AsyncIterator, first: list[bytes], replica: str, routes: Routes) -> AsyncIterator:
    """A replica's SSE stream (its first event already read); if the replica dies mid-way, the
    stream ends with an error event: the client has its tokens so far and is told the rest will not
    come. The replica's in-flight count drops when the stream ends, however it ends."""
    try:
        for chunk in first:
            yield chunk
        async for chunk in stream:
            yield chunk
    except Exception as e:
        log.warning("replica %s failed mid-response: %s", replica, e)
        error = {"error": {"message": f"the replica serving this request failed: {type(e).__name__}",
                           "type": "server_error", "param": None, "code": "replica_failed"}}
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        routes.inflight[replica] -= 1


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus text of several replicas as one exposition: each family once (its HELP and TYPE),
    with every replica's samples labelled replica="<name>"."""
    families: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                head = families.setdefault(family, [])
                if line not in head:
                    head.append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                name, _, rest = line.partition(" ")
                label = f'replica="{replica}"'
                name = name[:-1] + f",{label}}}" if name.endswith("}") else name + "{" + label + "}"
                samples.setdefault(family or name, []).append(f"{name} {rest}")
    out = []
    for family, lines in samples.items():
        out += families.get(family, []) + lines
    return "\n".join(out) + "\n"


def build_proxy_app(routes: Routes, forward: Forward, *, timeout_s: float = 60.0, hold_s: float = HOLD_S,
                    monitor: RatesMonitor | None = None) -> FastAPI:
    """The front door over `routes`; `forward` reaches a replica. A request for a model being moved
    waits up to `hold_s` for its new replica; `monitor` records each routed request's arrival."""
    app = FastAPI(title="fineserve-jax cluster", version="0.1.0")
    app.state.routing = {"count": 0, "seconds": 0.0}   # the proxy's own time per routed request

    async def each_replica(method: str, path: str) -> dict[str, tuple[int, dict, bytes]]:
        names = routes.replica_names
        results = await asyncio.gather(*(asyncio.wait_for(_collect(forward(r, method, path, b"", [])), timeout_s)
                                         for r in names), return_exceptions=True)
        return dict(zip(names, results))

    async def next_replica(model: str, failed: dict[str, str]) -> str | None:
        """A replica for `model` other than those that failed; while it has none (being moved, or
        its replicas lost and not yet placed again), wait up to hold_s for one."""
        deadline = time.monotonic() + hold_s
        while ((replica := routes.pick(model, set(failed))) is None and model in routes.replicas
               and time.monotonic() < deadline):
            await asyncio.sleep(HOLD_POLL_S)
        return replica

    async def routed(request: Request, path: str, arrival: bool = True):
        """Forward to a replica of the body's model; `arrival`: count it in the model's rate."""
        t0 = time.perf_counter()
        if routes.closing:
            return _error(503, "the server is shutting down", "shutting_down")
        body = await request.body()
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return _error(400, "the body must be a JSON object with a 'model'", "invalid_json")
        if model in routes.unplaced:
            return _error(503, f"the model {model!r} is not served: {routes.unplaced[model]}", "model_unavailable",
                          "model")
        if model not in routes.replicas:
            return _error(404, f"the model {model!r} does not exist; served: {sorted(routes.replicas)}",
                          "model_not_found", "model")
        if monitor is not None and arrival:
            monitor.record(model, time.monotonic())
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in ("content-type", "accept")]
        failed: dict[str, str] = {}
        while (replica := await next_replica(model, failed)) is not None:
            if not failed:   # the first attempt: the proxy's own time for this request (a hold excluded)
                app.state.routing["count"] += 1
                app.state.routing["seconds"] += time.perf_counter() - t0
            routes.inflight[replica] += 1
            stream = _until_lost(forward(replica, "POST", path, body, headers), routes.lost_signal(replica))
            try:
                status, response_headers, sse, first = await _answer_start(stream)
                break
            except BaseException as e:
                routes.inflight[replica] -= 1
                if not isinstance(e, Exception):   # cancelled: the client went away
                    raise
                # the replica is gone before answering: nothing was sent, try another
                failed[replica] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("replica %s failed before answering a %s request (%s); retrying elsewhere",
                            replica, model, failed[replica])
        if replica is None:
            why = routes.unplaced.get(model) or failed or "none is up (it is being moved)"
            return _error(503, f"no replica of {model!r} could answer: {why}", "model_unavailable", "model")
        passed = {k: v for k, v in response_headers if k.lower() in PASSED_HEADERS}
        passed["x-fineserve-replica"] = replica
        media_type = dict(response_headers).get("content-type") or None
        if not sse:
            routes.inflight[replica] -= 1
            return Response(b"".join(first), status_code=status, headers=passed, media_type=media_type)
        return StreamingResponse(_ended_explicitly(stream, first, replica, routes), status_code=status,
                                 headers=passed, media_type=media_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routed(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await routed(request, "/v1/chat/completions")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await routed(request, "/tokenize", arrival=False)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await routed(request, "/detokenize", arrival=False)

    @app.get("/v1/models")
    async def models():
        data = []
        for replica, result in (await each_replica("GET", "/v1/models")).items():
            if not isinstance(result, Exception) and result[0] == 200:
                data += [dict(card, replica=replica) for card in json.loads(result[2])["data"]]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        replicas, ok = {}, True
        for replica, result in (await each_replica("GET", "/health")).items():
            if isinstance(result, Exception):
                replicas[replica], ok = {"status": "unreachable", "error": repr(result)}, False
            else:
                replicas[replica] = json.loads(result[2])
                ok = ok and result[0] == 200
        models = {m: body for r in replicas.values() for m, body in r.get("models", {}).items()}
        status = ("shutting_down" if routes.closing else "starting" if not routes.replicas
                  else "ok" if ok else "degraded")
        moving = sorted(m for m, hosts in routes.replicas.items() if not hosts)   # waiting for a replica
        body = {"status": status, "models": models, "replicas": replicas, "moving": moving,
                "unplaced": routes.unplaced}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    @app.head("/metrics", include_in_schema=False)   # scrapers probe with HEAD
    async def metrics():
        texts = {r: res[2].decode() for r, res in (await each_replica("GET", "/metrics")).items()
                 if not isinstance(res, Exception) and res[0] == 200}
        routing = app.state.routing
        own = ("# HELP fineserve_proxy_routing_seconds The ingress's own time per routed request (reading the "
               "body, choosing the replica, calling it)\n# TYPE fineserve_proxy_routing_seconds summary\n"
               f"fineserve_proxy_routing_seconds_count {routing['count']}\n"
               f"fineserve_proxy_routing_seconds_sum {routing['seconds']}\n")
        return Response(merge_metrics(texts) + own, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
