"""Serving metrics from per-request records: latency distributions, SLO attainment, goodput, throughput.

Independent of the engine: a benchmark driver (real engine or simulator) fills one RequestRecord per
request. Definitions follow vLLM's benchmarks and FineServe (arXiv 2509.06261):
- TTFT = first output token time - arrival (queueing included); E2E = completion - arrival;
  TPOT = (E2E - TTFT) / (output_len - 1) per request (vLLM); ITL = every gap between consecutive
  streamed tokens, pooled over requests (vLLM).
- SLO attainment (FineServe): share of *all* requests that finished with TTFT < the model's TTFT SLO;
  dropped, aborted and failed requests are misses.
- Goodput (vLLM --goodput): requests that finished meeting every given bound (TTFT < ttft_s and, when
  set, TPOT <= tpot_s), as a share of all requests and per second.
- Throughput (FineServe): output tokens of finished requests / makespan, makespan = last completion -
  first arrival. Latency distributions cover finished requests only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from serving.scheduling.slo import SLO

REQUEST_STATUSES = ("finished", "dropped", "aborted", "failed")

@dataclass
class RequestRecord:
    request_id: str
    model: str
    arrival_s: float
    prompt_len: int
    output_len: int                 # tokens actually generated
    first_token_s: float | None = None
    finish_s: float | None = None   # completion time (last token) of a finished request
    token_times: list[float] = field(default_factory=list)  # time of each streamed token or chunk, first included
    status: str = "finished"        # one of REQUEST_STATUSES

    def __post_init__(self):
        if self.status not in REQUEST_STATUSES:
            raise ValueError(f"request {self.request_id!r}: status must be one of {REQUEST_STATUSES}, "
                             f"got {self.status!r}")
        if self.output_len < 0:
            raise ValueError(f"request {self.request_id!r}: output_len must be >= 0, got {self.output_len}")
        if self.status == "finished":
            if self.first_token_s is None or self.finish_s is None:
                raise ValueError(f"finished request {self.request_id!r} needs first_token_s and finish_s")
            if not self.arrival_s <= self.first_token_s <= self.finish_s:
                raise ValueError(f"request {self.request_id!r}: need arrival_s <= first_token_s <= finish_s, got "
                                 f"{self.arrival_s}, {self.first_token_s}, {self.finish_s}")
        if any(b < a for a, b in zip(self.token_times, self.token_times[1:])):
            raise ValueError(f"request {self.request_id!r}: token_times must be non-decreasing")

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.output_len < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist() if len(self.token_times) > 1 else []


@dataclass
class LatencyStats:
    """Mean and percentiles (numpy's linear interpolation, as vLLM) in seconds; None without samples."""
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencyStats:
        x = np.asarray(list(values), dtype=float)
        if x.size == 0:
            return cls(0, None, None, None, None)
        p50, p90, p99 = np.percentile(x, [50, 90, 99]).tolist()
        return cls(int(x.size), float(x.mean()), p50, p90, p99)


@dataclass
class GroupSummary:
    """Metrics of one model's requests, or of all requests."""
    count: int
    finished: int
    dropped: int
    aborted: int
    failed: int
    slo_attainment: float | None     # share of all requests; None without requests
    goodput_attainment: float | None
    goodput_req_s: float | None      # goodput requests / (duration_s, or makespan when not given)
    output_tokens: int               # of finished requests
    throughput_tok_s: float | None   # output_tokens / makespan
    throughput_req_s: float | None   # finished / makespan
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats


@dataclass
class Summary:
    overall: GroupSummary
    per_model: dict[str, GroupSummary]
    slos: dict[str, SLO]
    makespan_s: float | None   # last completion - first arrival, over all requests
    duration_s: float | None   # the run's duration when given (goodput per second uses it)
    # KV bytes decode attention read over what dense attention reads (page selection makes it < 1);
    # None where the run does not count them (the simulator)
    kv_read_share: float | None = None

    def to_dict(self) -> dict:
        """JSON-safe: plain types only, NaN and infinities as None."""
        return _json_safe({
            "makespan_s": self.makespan_s, "duration_s": self.duration_s, "kv_read_share": self.kv_read_share,
            "overall": _group_dict(self.overall),
            "per_model": {m: _group_dict(g) for m, g in self.per_model.items()},
            "slos": {m: {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for m, s in self.slos.items()},
        })

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


def summarize(records: Iterable[RequestRecord], slos: Mapping[str, SLO], duration_s: float | None = None) -> Summary:
    """Per-model and overall metrics. Every model in records needs an SLO. Per-model rates use the
    whole run's makespan (and duration_s), so per-model throughputs add up to the overall one."""
    records = list(records)
    models = list(dict.fromkeys(r.model for r in records))
    missing = [m for m in models if m not in slos]
    if missing:
        raise ValueError(f"no SLO given for models {missing}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    ids = [r.request_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique within one summary")
    completions = [r.finish_s for r in records if r.status == "finished"]
    makespan = max(completions) - min(r.arrival_s for r in records) if completions else None
    rate_window = duration_s if duration_s is not None else makespan
    return Summary(overall=_summarize_group(records, slos, makespan, rate_window),
                   per_model={m: _summarize_group([r for r in records if r.model == m], slos, makespan, rate_window)
                              for m in models},
                   slos={m: slos[m] for m in models}, makespan_s=makespan, duration_s=duration_s)


def meets_ttft(record: RequestRecord, slo: SLO) -> bool:
    return record.status == "finished" and record.ttft < slo.ttft_s


def meets_all(record: RequestRecord, slo: SLO) -> bool:
    """Goodput condition: finished, TTFT < ttft_s, and TPOT <= tpot_s when set (a request with one output
    token has no TPOT and meets that bound)."""
    if not meets_ttft(record, slo):
        return False
    return slo.tpot_s is None or record.tpot is None or record.tpot <= slo.tpot_s


def format_table(summaries: Mapping[str, Summary], per_model: bool = False) -> str:
    """A Markdown table comparing systems (one Summary each); with per_model, one row per model too.
    Latencies in ms, attainment in %."""
    header = ["system", "model", "reqs", "done", "drop", "SLO att %", "goodput %", "goodput/s", "tok/s", "req/s",
              "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "ITL p99 ms", "E2E p50 ms", "KV read %"]
    rows = []
    for system, summary in summaries.items():
        groups = [("all", summary.overall)]
        if per_model:
            groups += list(summary.per_model.items())
        for model, g in groups:
            rows.append([system, model, str(g.count), str(g.finished), str(g.dropped),
                         _fmt(g.slo_attainment, 100, 1), _fmt(g.goodput_attainment, 100, 1),
                         _fmt(g.goodput_req_s, 1, 2), _fmt(g.throughput_tok_s, 1, 1), _fmt(g.throughput_req_s, 1, 2),
                         _fmt(g.ttft.p50, 1e3, 1), _fmt(g.ttft.p99, 1e3, 1), _fmt(g.tpot.p50, 1e3, 2),
                         _fmt(g.tpot.p99, 1e3, 2), _fmt(g.itl.p99, 1e3, 2), _fmt(g.e2e.p50, 1e3, 1),
                         _fmt(summary.kv_read_share if model == "all" else None, 100, 1)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    separator = "|" + "|".join(("-" * (w + 2)) if i < 2 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), separator] + [line(r) for r in rows])


def _summarize_group(records: list[RequestRecord], slos: Mapping[str, SLO], makespan: float | None,
                     rate_window: float | None) -> GroupSummary:
    finished = [r for r in records if r.status == "finished"]
    statuses = {s: sum(r.status == s for r in records) for s in REQUEST_STATUSES}
    n = len(records)
    met_ttft = sum(meets_ttft(r, slos[r.model]) for r in records)
    met_all = sum(meets_all(r, slos[r.model]) for r in records)
    output_tokens = sum(r.output_len for r in finished)
    has_makespan = makespan is not None and makespan > 0
    return GroupSummary(
        count=n, finished=statuses["finished"], dropped=statuses["dropped"], aborted=statuses["aborted"],
        failed=statuses["failed"],
        slo_attainment=met_ttft / n if n else None,
        goodput_attainment=met_all / n if n else None,
        goodput_req_s=met_all / rate_window if rate_window else None,
        output_tokens=output_tokens,
        throughput_tok_s=output_tokens / makespan if has_makespan else None,
        throughput_req_s=len(finished) / makespan if has_makespan else None,
        ttft=LatencyStats.of(r.ttft for r in finished),
        tpot=LatencyStats.of(r.tpot for r in finished if r.tpot is not None),
        itl=LatencyStats.of(gap for r in finished for gap in r.itls),
        e2e=LatencyStats.of(r.e2e for r in finished),
    )


def _group_dict(g: GroupSummary) -> dict:
    out = {k: v for k, v in vars(g).items() if not isinstance(v, LatencyStats)}
    out.update({k: vars(v) for k, v in vars(g).items() if isinstance(v, LatencyStats)})
    return out


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _fmt(value: float | None, factor: float, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * factor:.{digits}f}"
