"""Replaying a workload on one device's models: the loop shared by real runs and the simulator.

A `Workload` request carries lengths, not text, so the replay sends a synthetic prompt of the given
length (distinct per request) and forces the output length (`max_tokens`, EOS ignored), as trace
replays do. `replay` feeds requests to a `DeviceRuntime` when their arrival time comes on `clock`,
steps the runtime while any model has work, and waits for the next arrival when idle. On a wall
clock that is a real run (times relative to the start); on a simulated clock whose time the
stand-in runners advance (see `serving.sim.simulator`) the same loop is a discrete-event simulation
of that device.

Every request ends as one `RequestRecord`: finished, dropped by admission, or failed (refused at
submission, e.g. a prompt longer than the model's context), never lost. Design notes:
docs/scheduling.md (simulator).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from serving.runtime.device_runtime import DeviceRuntime
from serving.sim.metrics import RequestRecord
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.sim.workload import Request

PROMPT_TOKEN = 1  # synthetic prompts repeat one in-vocabulary token ...
ID_BITS = 32      # ... after their request id's hash in tokens 0 and 1 (in every vocabulary)


def synthetic_prompt(request: Request) -> list[int]:
    """`request.prompt_len` tokens that start with 32 bits of a hash of its id: two requests of a
    trace never share a prefix (and prefix-cache pages) by accident, as real prompts seldom do."""
    bits = int.from_bytes(hashlib.blake2b(request.request_id.encode(), digest_size=4).digest(), "little")
    head = [bits >> i & 1 for i in range(ID_BITS)]
    return (head + [PROMPT_TOKEN] * max(0, request.prompt_len - ID_BITS))[:request.prompt_len]


class WallClock:
    """Seconds since construction; `wait_until` sleeps."""

    def __init__(self):
        self._start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self()))


def replay_params(request: Request) -> SamplingParams:
    return SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0)


def record_of(request: Request, output: RequestOutput | None) -> RequestRecord:
    """The outcome of `request`: its final output, or None when it was refused at submission."""
    if output is None:
        return RequestRecord(request.request_id, request.model, request.arrival_s, request.prompt_len, 0,
                             status="failed")
    m = output.metrics
    completion = output.outputs[0]
    status = {"dropped": "dropped", "abort": "aborted"}.get(completion.finish_reason, "finished")
    return RequestRecord(request.request_id, request.model, request.arrival_s, request.prompt_len,
                         len(completion.token_ids),
                         first_token_s=m.first_token_time if status == "finished" else None,
                         finish_s=m.finished_time if status == "finished" else None,
                         token_times=list(m.token_times), status=status)


def replay(runtime: DeviceRuntime, requests: list[Request], clock: Callable[[], float],
           wait_until: Callable[[float], None], *, progress: Callable[[int], None] | None = None
           ) -> list[RequestRecord]:
    """Run `requests` (`model` names an engine of `runtime`) to completion, with every engine
    stamping times on `clock`. Returns one record per request, in arrival order."""
    for engine in runtime.engines.values():
        engine.use_clock(clock)
    pending = sorted(requests, key=lambda r: r.arrival_s)
    by_id = {r.request_id: r for r in pending}
    records: dict[str, RequestRecord] = {}
    i = 0
    while i < len(pending) or runtime.has_unfinished_requests():
        now = clock()
        while i < len(pending) and pending[i].arrival_s <= now:
            _submit(runtime, pending[i], records)
            i += 1
        if not runtime.has_unfinished_requests():
            if i < len(pending):
                wait_until(pending[i].arrival_s)
            continue
        for _, out in runtime.step():
            if out.finished:
                records[out.request_id] = record_of(by_id[out.request_id], out)
                if progress:
                    progress(1)
    missing = set(by_id) - set(records)
    assert not missing, f"requests without an outcome: {sorted(missing)[:5]}"
    return [records[r.request_id] for r in pending]


def _submit(runtime: DeviceRuntime, request: Request, records: dict[str, RequestRecord]) -> None:
    engine = runtime.engines.get(request.model)
    if engine is None:
        raise ValueError(f"request {request.request_id!r} names model {request.model!r}, not on this device "
                         f"({sorted(runtime.engines)})")
    try:
        engine.add_request(synthetic_prompt(request), replay_params(request),
                           request_id=request.request_id, arrival_time=request.arrival_s)
    except ValueError:  # e.g. longer than the model's context: an explicit failure, not a loss
        records[request.request_id] = record_of(request, None)
