"""One device's engine loop in its own thread, driven from asyncio: submit, stream, abort, drain.

HTTP handlers run on an asyncio event loop; the DeviceRuntime (every model's engine over one
shared pool) is not thread-safe and its steps block, so one thread owns it. Handlers post commands
(add, abort) to the thread's inbox; the thread applies them between steps, steps the runtime and
hands every output to its request's asyncio queue. Nothing is ever dropped silently:

- `submit` refuses up front (`Overloaded`, with a retry hint) when a model's bounded queue is full,
  and (`ShuttingDown`) once `drain` has begun;
- every accepted request ends with a finished output or an error item on its stream: a model whose
  step raises fails its own requests (`ModelFailed`) and keeps serving; `drain` gives in-flight
  requests until a deadline and then fails the rest (`ShuttingDown`);
- `abort` (a client that went away) finishes the request and frees its pages at the next step.
Design notes: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import jax

from serving.runtime.device_runtime import DeviceRuntime, ModelStepError
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import RequestOutput

log = logging.getLogger("fineserve.runtime")


class Overloaded(Exception):
    """The model's queue is full; try again after `retry_after` seconds."""

    def __init__(self, model: str, pending: int, retry_after: float):
        super().__init__(f"model {model!r} is overloaded ({pending} requests queued or running); retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining: no new requests, and in-flight ones past the deadline are failed."""


class ModelFailed(Exception):
    """The model's step raised while this request was in flight; the model itself recovered."""


@dataclass
class ModelLimits:
    max_pending: int  # queued + running requests (n samples count n) before Overloaded


class RequestStream:
    """What `submit` returns: the outputs of one request's `n` samples, as they are produced.

    Iterate with `async for index, output in stream`; it ends once every sample finished, or raises
    the error that ended the request (ModelFailed, ShuttingDown)."""

    def __init__(self, model: str, request_id: str, n: int):
        self.model = model
        self.request_id = request_id
        self.sample_ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: dict[int, RequestOutput] = {}
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.released = False  # its slots were given back (see AsyncRuntime.release)

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.finished) == len(self.sample_ids)

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while not self.done:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.error = item
                raise item
            index, out = item
            if out.finished:
                self.finished[index] = out
            yield index, out


@dataclass
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None


class AsyncRuntime:
    """Owns `runtime` on a worker thread; `submit`/`abort`/`drain` are called from the event loop."""

    def __init__(self, runtime: DeviceRuntime, limits: dict[str, ModelLimits], *, device=None,
                 name: str = "device0"):
        missing = sorted(set(runtime.engines) - set(limits))
        if missing:
            raise ValueError(f"no limits given for models {missing}")
        self.runtime = runtime
        self.limits = limits
        self.device = device
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # sample id -> (stream, index); thread-owned
        self._pending: dict[str, int] = {m: 0 for m in runtime.engines}  # loop-owned
        self._recent_e2e: dict[str, deque] = {m: deque(maxlen=32) for m in runtime.engines}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failures: dict[str, int] = {m: 0 for m in runtime.engines}
        self.snapshot: dict = {}  # published by the worker after each step (see _publish)

    # ---- event-loop side -----------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.runtime.engines)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._publish()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def pending(self, model: str) -> int:
        return self._pending[model]

    def submit(self, model: str, prompt_token_ids: list[int], params: SamplingParams, *,
               prompt: str | None = None, request_id: str | None = None) -> RequestStream:
        """Queue one request (its `params.n` samples run as n engine requests). Raises
        ShuttingDown, or Overloaded when the model's queue bound would be exceeded."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        n = params.n
        pending = self._pending[model]
        if pending + n > self.limits[model].max_pending:
            raise Overloaded(model, pending, self.retry_after(model))
        stream = RequestStream(model, request_id or f"req-{next(self._ids)}", n)
        self._pending[model] += n
        self._post(_Add(stream, list(prompt_token_ids), params, prompt))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """The caller gave up on `stream` (e.g. the client disconnected): finish it, free its pages."""
        if not stream.done:
            self._post(("abort", stream))

    def retry_after(self, model: str) -> float:
        """Seconds until a slot is likely free: about one recent request lifetime (1 s if none)."""
        recent = self._recent_e2e[model]
        return max(1.0, sum(recent) / len(recent)) if recent else 1.0

    def release(self, stream: RequestStream) -> None:
        """The handler is done with `stream` (finished, failed or aborted): its slots are free."""
        if stream.released:
            return
        stream.released = True
        self._pending[stream.model] -= len(stream.sample_ids)
        if stream.done and stream.error is None:
            self._recent_e2e[stream.model].append(time.monotonic() - stream.submitted_at)

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; give in-flight requests `timeout_s` to finish, then fail the rest with
        ShuttingDown; stop the worker. Returns how many requests were failed."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while sum(self._pending.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = sum(self._pending.values())
        done = asyncio.Event()
        self._post(("shutdown", done))
        await done.wait()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        return left

    def _post(self, command) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # ---- worker-thread side --------------------------------------------------------------------
    def _run(self) -> None:
        ctx = jax.default_device(self.device) if self.device is not None else contextlib.nullcontext()
        with ctx:
            while not self._stop:
                if self._apply_inbox():
                    self._publish()  # e.g. an abort freed pages while nothing else runs
                if self._stop:
                    break
                if not self.runtime.has_unfinished_requests():
                    with self._wake:
                        if not self._inbox:
                            self._wake.wait(timeout=0.5)
                    continue
                try:
                    outputs = self.runtime.step()
                except ModelStepError as e:
                    self._recover(e.model, e.__cause__)
                    outputs = []
                except Exception as e:  # the runtime itself: fail everything in flight, keep going
                    log.exception("device runtime %s failed; failing every in-flight request", self.name)
                    for name, engine in self.runtime.engines.items():
                        if engine.requests:
                            self._recover(name, e)
                    outputs = []
                for _, out in outputs:
                    self._deliver(out)
                self._publish()

    def _recover(self, model: str, cause: BaseException) -> None:
        log.error("model %s failed; failing its requests and recovering", model, exc_info=cause)
        self.failures[model] += 1
        error = ModelFailed(f"model {model!r} failed while serving this request: {type(cause).__name__}: {cause}")
        for out in self.runtime.recover(model):
            self._fail(out.request_id, error)

    def _apply_inbox(self) -> bool:
        """Apply the queued commands; whether there were any."""
        applied = False
        while True:
            with self._wake:
                if not self._inbox:
                    return applied
                command = self._inbox.popleft()
            applied = True
            if isinstance(command, _Add):
                self._add(command)
            elif command[0] == "abort":
                self._abort(command[1])
            else:  # shutdown: fail whatever is still in flight, explicitly
                for engine in self.runtime.engines.values():
                    for out in engine.abort_all("abort"):
                        self._fail(out.request_id, ShuttingDown("the server shut down before this request finished"))
                self._stop = True
                self._publish()
                self.loop.call_soon_threadsafe(command[1].set)

    def _add(self, cmd: _Add) -> None:
        stream = cmd.stream
        engine = self.runtime.engines[stream.model]
        try:
            engine.add_samples(cmd.prompt_token_ids, cmd.params, prompt=cmd.prompt, request_ids=stream.sample_ids)
        except Exception as e:  # validated before submit, so this is a bug: fail the request, loudly
            log.exception("could not queue request %s", stream.request_id)
            self._put(stream, ModelFailed(f"could not queue the request: {e}"))
            return
        for i, rid in enumerate(stream.sample_ids):
            self._streams[rid] = (stream, i)

    def _abort(self, stream: RequestStream) -> None:
        engine = self.runtime.engines[stream.model]
        for rid in stream.sample_ids:
            if self._streams.pop(rid, None) is not None:
                engine.abort_request(rid)

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return  # aborted by its caller
        stream, index = entry
        if out.finished:
            del self._streams[out.request_id]
        self._put(stream, (index, out))

    def _fail(self, request_id: str, error: BaseException) -> None:
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            stream = entry[0]
            for rid in stream.sample_ids:  # its other samples end too
                if self._streams.pop(rid, None) is not None:
                    self.runtime.engines[stream.model].abort_request(rid)
            self._put(stream, error)

    def _put(self, stream: RequestStream, item) -> None:
        self.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _publish(self) -> None:
        """A consistent view of the runtime for /metrics and /health, taken between steps."""
        stats = self.runtime.pool_stats()
        models = {}
        for name, engine in self.runtime.engines.items():
            cached = self.runtime.cached_pages(name)
            used = stats["models"][name]["used_pages"] - cached
            cache = engine.pages.cache
            waiting, running = engine.queues()
            models[name] = {"waiting": len(waiting), "running": len(running),
                            "preemptions": engine.num_preemptions, "used_pages": used, "cached_pages": cached,
                            "kv_bytes": used * stats["models"][name]["page_bytes"],
                            "prefix_cache_bytes": cached * stats["models"][name]["page_bytes"],
                            "prefix_queried_tokens": cache.queried_tokens if cache is not None else 0,
                            "prefix_hit_tokens": cache.hit_tokens if cache is not None else 0,
                            "decode_kv_bytes_read": engine.stats.decode_kv_bytes_read,
                            "decode_kv_bytes_dense": engine.stats.decode_kv_bytes_dense,
                            "recall_hits": engine.stats.recall_hits, "recall_pages": engine.stats.recall_pages,
                            "failures": self.failures[name]}
        self.snapshot = {"pool_bytes": stats["pool_bytes"], "used_bytes": stats["pool_bytes"] - stats["free_bytes"],
                         "live_kv_bytes": stats["live_kv_bytes"]
                         - sum(m["prefix_cache_bytes"] for m in models.values()),
                         "models": models, "time": time.time()}
