"""The server under abuse: overload, disconnects, shutdown, a failing model, and fuzzing against its
own OpenAPI schema. The invariant everywhere: every request gets a completion or an explicit error
(429/503/500 with an OpenAI error body), none is lost, and its KV pages come back to the pool.

Steps are slowed down where timing matters (a sleep around each model step), so that requests are
reliably still running when a client leaves or the server is told to stop."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from serving.scheduling.cost_model import StepCost
from tests.helpers import evict_prefix_caches
from tests.server_helpers import running_server, tiny_models, tokenizer, wait_for

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests


@pytest.fixture(scope="module")
def models():
    return tiny_models(tokenizer())


def slow_steps(server, seconds: float = 0.02) -> None:
    """Every model step takes at least `seconds` longer."""
    for engine in server.fleet.runtime.engines.values():
        dispatch = engine.runner.dispatch

        def slowed(*args, dispatch=dispatch, **kwargs):
            time.sleep(seconds)
            return dispatch(*args, **kwargs)

        engine.runner.dispatch = slowed


def long_request(model: str, max_tokens: int = 64, **extra) -> dict:
    return {"model": model, "prompt": [1, 2, 3, 4, 5], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


def sse_events(lines) -> list:
    return [json.loads(ln[6:]) if ln != "data: [DONE]" else "[DONE]" for ln in lines if ln.startswith("data: ")]


def test_overload_every_request_completes_or_gets_429(models):
    with running_server(models, max_num_seqs=2, max_queue=2) as srv:  # 4 in flight per model
        slow_steps(srv, 0.005)

        async def fire():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
                reqs = [c.post("/completions", json=long_request(models[i % 3].name, 12)) for i in range(36)]
                reqs += [c.post("/chat/completions", json={"model": "tiny-bf16", "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "hi"}]})
                         for _ in range(6)]
                return await asyncio.gather(*reqs)

        responses = asyncio.run(fire())
        assert len(responses) == 42
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) > 0 and codes.count(200) >= 12  # bounded: some shed, many served
        for r in responses:
            body = r.json()
            if r.status_code == 200:
                assert body["usage"]["completion_tokens"] in (4, 12)
                assert body["choices"][0]["finish_reason"] == "length"
            else:
                assert body["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        metrics = httpx.get(srv.url + "/metrics").text
        served = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                     if ln.startswith("fineserve_requests_total") and 'status="ok"' in ln)
        shed = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                   if ln.startswith("fineserve_requests_total") and 'status="overloaded"' in ln)
        assert (served, shed) == (codes.count(200), codes.count(429))
        wait_for(lambda: srv.used_pages() == 0, what="pages back")


def test_disconnect_aborts_the_request_and_frees_its_pages(models, caplog):
    with running_server(models) as srv:
        slow_steps(srv, 0.03)
        # Streaming: read a few chunks, then hang up.
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            with c.stream("POST", "/completions", json=long_request("tiny-w4a16", 80, stream=True)) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert sum(ln.startswith("data: ") for ln in got) >= 3
                assert srv.used_pages("tiny-w4a16") > 0
        wait_for(lambda: srv.used_pages() == 0 and not srv.engine("tiny-w4a16").requests, what="stream aborted")
        # Not streaming: the client times out and leaves.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/completions", json=long_request("tiny-bf16", 80), timeout=0.8)
        wait_for(lambda: srv.used_pages() == 0 and not srv.engine("tiny-bf16").requests, what="request aborted")
        assert all(rt.pending(m) == 0 for rt in srv.state.runtimes for m in rt.model_names)
        # The server is fine afterwards.
        r = httpx.post(srv.base_url + "/completions", json=long_request("tiny-bf16", 3), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_shutdown_finishes_or_explicitly_fails_every_request(models):
    with running_server(models, drain_timeout_s=1.0) as srv:
        for m in models:  # compile each model's programs first: the drain timeout is for serving
            assert httpx.post(srv.base_url + "/completions", json=long_request(m.name, 2), timeout=60).status_code == 200
        slow_steps(srv, 0.03)
        results = {}

        def call(key, body, stream=False):
            try:
                with httpx.Client(base_url=srv.base_url, timeout=60) as c:
                    if stream:
                        with c.stream("POST", "/completions", json=body) as r:
                            results[key] = (r.status_code, sse_events(list(r.iter_lines())))
                    else:
                        r = c.post("/completions", json=body)
                        results[key] = (r.status_code, r.json(), r.headers.get("Retry-After"))
            except httpx.HTTPError as e:  # pragma: no cover - would be a lost request
                results[key] = ("transport error", repr(e))

        threads = [threading.Thread(target=call, args=a) for a in (
            ("short", long_request("tiny-bf16", 2)),
            ("long", long_request("tiny-w8a8", 90)),
            ("long-stream", long_request("tiny-w4a16", 90, stream=True), True))]
        for t in threads:
            t.start()
        wait_for(lambda: srv.used_pages("tiny-w8a8") > 0 and srv.used_pages("tiny-w4a16") > 0, what="in flight")
        srv.server.handle_exit(15, None)
        wait_for(lambda: srv.state.draining, what="draining")
        late = httpx.post(srv.base_url + "/completions", json=long_request("tiny-bf16", 2), timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + "/health").status_code == 503
        for t in threads:
            t.join(60)
        srv.thread.join(30)
        assert not srv.thread.is_alive()
        assert results["short"][0] == 200 and results["short"][1]["usage"]["completion_tokens"] == 2
        status, body, retry = results["long"]
        assert status == 503 and body["error"]["code"] == "shutting_down" and retry is not None
        status, events = results["long-stream"]
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "shutting_down"
        assert events[:-2] and all(e["choices"][0]["text"] for e in events[:-2])  # it had streamed tokens
        evict_prefix_caches(*srv.fleet.runtime.engines.values())   # the engine thread has stopped
        assert srv.fleet.pool.allocator.stats()["used_pages"] == {m: 0 for m in srv.fleet.model_names}


def _flaky(engine, lose_pool: bool):
    """Make `engine`'s next step raise once armed; optionally as if the failing program had taken the
    donated pool with it (the buffer is deleted)."""
    armed = threading.Event()
    dispatch = engine.runner.dispatch

    def failing(words, *args, **kwargs):
        if armed.is_set():
            armed.clear()
            if lose_pool:
                words.delete()
            raise RuntimeError("injected fault")
        return dispatch(words, *args, **kwargs)

    engine.runner.dispatch = failing
    return armed


@pytest.mark.parametrize("lose_pool", [False, True], ids=["exception", "exception-losing-the-pool"])
def test_a_failing_model_fails_only_its_requests_and_recovers(models, lose_pool):
    others = ("tiny-bf16", "tiny-w4a16")
    with running_server(models) as srv:
        slow_steps(srv, 0.02)
        url = srv.base_url + "/completions"
        reference = {m: httpx.post(url, json=long_request(m, 40), timeout=60).json()["choices"][0]["text"]
                     for m in others}
        armed = _flaky(srv.engine("tiny-w8a8"), lose_pool)
        results = {}

        def call(m):
            results[m] = httpx.post(url, json=long_request(m, 40), timeout=60)

        threads = [threading.Thread(target=call, args=(m,)) for m in others]
        for t in threads:
            t.start()
        wait_for(lambda: all(srv.used_pages(m) > 0 for m in others), what="others in flight")
        armed.set()
        failed = httpx.post(url, json=long_request("tiny-w8a8", 5), timeout=60)
        for t in threads:
            t.join(60)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_error"
        assert "injected fault" in failed.json()["error"]["message"]
        for m in others:  # untouched, or recomputed after losing their KV: the same greedy text
            assert results[m].status_code == 200
            assert results[m].json()["choices"][0]["text"] == reference[m]
        again = httpx.post(url, json=long_request("tiny-w8a8", 5), timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
        assert srv.state.runtimes[0].failures == {"tiny-bf16": 0, "tiny-w8a8": 1, "tiny-w4a16": 0}
        assert 'fineserve_model_failures_total{model="tiny-w8a8"} 1.0' in httpx.get(srv.url + "/metrics").text
        wait_for(lambda: srv.used_pages() == 0, what="pages back")


@pytest.mark.parametrize("drop_hopeless", [True, False], ids=["drop", "defer"])
def test_saab_drops_or_defers_a_request_that_cannot_meet_its_slo(models, drop_hopeless):
    """SAAB in the server: on a cost model of 1 s per prompt token and a 5 s TTFT SLO, an 8-token
    prompt is hopeless. Dropped: a 503 `dropped` with Retry-After, counted and logged, nothing held.
    Deferred (the default): still served, behind every request that can make it."""
    slow = StepCost(prefill=(0.0, 1.0, 0.0), decode=(1e-3, 0.0, 0.0, 0.0), pad_to_buckets=False)
    with running_server(models, step_costs={m.name: slow for m in models}, admission="saab",
                        drop_hopeless=drop_hopeless, step_policy="edf") as srv:
        body = long_request("tiny-bf16", 4, prompt=list(range(1, 9)))
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        quick = httpx.post(srv.url + "/v1/completions", json=long_request("tiny-bf16", 4, prompt=[5, 6]), timeout=60)
        assert quick.status_code == 200  # 2 s of predicted prefill: on time, admitted
        if drop_hopeless:
            assert r.status_code == 503 and r.json()["error"]["code"] == "dropped", r.text
            assert float(r.headers["retry-after"]) > 0
            assert 'fineserve_requests_total{model="tiny-bf16",status="dropped"} 1.0' in \
                httpx.get(srv.url + "/metrics").text
        else:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        wait_for(lambda: srv.used_pages() == 0, what="pages back")


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzing_the_openapi_schema_finds_no_5xx(models, mode):
    """Schema-driven requests, valid and invalid, to every operation: never a 5xx, always a response
    that matches the schema's status codes and bodies, and the server stays up."""
    with running_server(models) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
        calls = []
        names = srv.fleet.model_names
        for result in schema.get_all_operations():
            op = result.ok()
            if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # no parameters to get wrong

            @hypothesis.settings(max_examples=18, deadline=None, database=None, derandomize=False,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(names))
            def fuzz(case, model):
                if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                    case.body["model"] = model  # a served one, or every valid request is a 404
                response = case.call(base_url=srv.url, timeout=60)
                error = response.json().get("error") if response.status_code != 200 else None
                calls.append((op.method.upper(), response.status_code, error and error.get("param")))
                case.validate_response(response, checks=checks)

            fuzz()
        codes = [code for _, code, _ in calls]
        assert len(calls) >= 25 and max(codes) < 500
        posts = [(code, param) for method, code, param in calls if method == "POST"]
        if mode is schemathesis.GenerationMode.POSITIVE:
            # Schema-valid bodies can still break rules between fields or against the model (prompt
            # over the context, token ids past the vocabulary, min_tokens > max_tokens): those get a
            # 400 naming the parameter. The rest are served; about 40% of them in runs seen so far
            # (9 to 29 of 50), so at least 5 shows the generation path was exercised, not refused.
            assert all(code == 200 or (code == 400 and param) for code, param in posts), posts
            assert sum(code == 200 for code, _ in posts) >= 5, posts
        else:
            assert all(code == 400 for code, _ in posts), posts
        assert httpx.get(srv.url + "/health").status_code == 200
        wait_for(lambda: srv.used_pages() == 0, what="pages back")
