"""Prometheus metrics of the HTTP server, on a registry of its own (no process-wide globals).

Per request (recorded when it ends): TTFT, TPOT and E2E histograms, prompt and generated tokens,
requests by status, and TTFT-SLO attainment. Per scrape (read from each device runtime's snapshot,
taken between steps): queue length, running sequences, preemptions, model failures and pool use.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, runtimes, slo_ttft_s: dict[str, float]):
        """runtimes: the AsyncRuntimes serving; slo_ttft_s: each model's TTFT SLO."""
        self.registry = CollectorRegistry()
        self.slo_ttft_s = slo_ttft_s
        self._slo = {m: [0, 0] for m in slo_ttft_s}  # model -> [met, finished]
        r = self.registry
        self.ttft = Histogram("fineserve_time_to_first_token_seconds", "TTFT", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fineserve_time_per_output_token_seconds", "mean time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("fineserve_e2e_request_latency_seconds", "arrival to last token", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("fineserve_requests", "requests by final status", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("fineserve_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("fineserve_generation_tokens", "generated tokens", ["model"], registry=r)
        r.register(_RuntimeCollector(runtimes, self._slo))

    def observe(self, model: str, status: str, prompt_tokens: int, output_tokens: int,
                ttft_s: float | None, e2e_s: float | None) -> None:
        """One request ended with `status` ("ok", or the error kind); latencies where known."""
        self.requests.labels(model, status).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(output_tokens)
        if status != "ok":
            if status != "cancelled":
                self._slo[model][1] += 1  # failed, dropped or shed: an SLO miss
            return
        self._slo[model][1] += 1
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
            self._slo[model][0] += ttft_s <= self.slo_ttft_s[model]
        if e2e_s is not None:
            self.e2e.labels(model).observe(e2e_s)
            if ttft_s is not None and output_tokens > 1:
                self.tpot.labels(model).observe((e2e_s - ttft_s) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeCollector:
    """Gauges read at scrape time from the runtimes' published snapshots."""

    def __init__(self, runtimes, slo: dict[str, list[int]]):
        self.runtimes = runtimes
        self.slo = slo

    def collect(self):
        queue = GaugeMetricFamily("fineserve_queue_length", "requests waiting to be scheduled", labels=["model"])
        running = GaugeMetricFamily("fineserve_running_sequences", "sequences in the running batch", labels=["model"])
        kv = GaugeMetricFamily("fineserve_kv_bytes", "KV pool bytes held by the model's pages", labels=["model"])
        preempt = CounterMetricFamily("fineserve_preemptions", "sequences preempted for KV pages", labels=["model"])
        fails = CounterMetricFamily("fineserve_model_failures", "steps that raised (the model recovered)",
                                    labels=["model"])
        kv_read = CounterMetricFamily("fineserve_decode_kv_bytes_read", "KV bytes decode attention read (pages "
                                      "attended and, with page selection, key bounds scored)", labels=["model"])
        kv_dense = CounterMetricFamily("fineserve_decode_kv_bytes_dense", "KV bytes dense decode attention would "
                                       "have read in the same steps", labels=["model"])
        recall = GaugeMetricFamily("fineserve_page_selection_recall", "sampled decode steps: share of the selected "
                                   "KV pages among as many pages of most dense-attention mass", labels=["model"])
        cache = GaugeMetricFamily("fineserve_prefix_cache_bytes", "KV pool bytes in idle cached prefix pages "
                                  "(reclaimed first)", labels=["model"])
        queries = CounterMetricFamily("fineserve_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                      labels=["model"])
        hits = CounterMetricFamily("fineserve_prefix_cache_hits", "prompt tokens found in the prefix cache",
                                   labels=["model"])
        pool = GaugeMetricFamily("fineserve_pool_bytes", "KV pool size", labels=["device"])
        used = GaugeMetricFamily("fineserve_pool_used_bytes", "KV pool bytes in slabs owned by a model",
                                 labels=["device"])
        util = GaugeMetricFamily("fineserve_pool_utilization", "share of the KV pool holding live KV pages",
                                 labels=["device"])
        for rt in self.runtimes:
            snap = rt.snapshot
            if not snap:
                continue
            for name, m in snap["models"].items():
                queue.add_metric([name], m["waiting"])
                running.add_metric([name], m["running"])
                kv.add_metric([name], m["kv_bytes"])
                preempt.add_metric([name], m["preemptions"])
                fails.add_metric([name], m["failures"])
                kv_read.add_metric([name], m["decode_kv_bytes_read"])
                kv_dense.add_metric([name], m["decode_kv_bytes_dense"])
                cache.add_metric([name], m["prefix_cache_bytes"])
                queries.add_metric([name], m["prefix_queried_tokens"])
                hits.add_metric([name], m["prefix_hit_tokens"])
                if m["recall_pages"]:
                    recall.add_metric([name], m["recall_hits"] / m["recall_pages"])
            pool.add_metric([rt.name], snap["pool_bytes"])
            used.add_metric([rt.name], snap["used_bytes"])
            util.add_metric([rt.name], snap["live_kv_bytes"] / snap["pool_bytes"])
        attainment = GaugeMetricFamily("fineserve_slo_attainment",
                                       "share of ended requests whose TTFT met the model's SLO", labels=["model"])
        for name, (met, total) in self.slo.items():
            attainment.add_metric([name], met / total if total else 1.0)
        yield from (queue, running, kv, preempt, fails, kv_read, kv_dense, recall, cache, queries, hits, pool, used,
                    util, attainment)
