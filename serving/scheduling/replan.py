"""Re-placement when traffic drifts: `RatesMonitor` counts arrivals in a sliding window;
`rate_drift` / `should_replan` flag a model whose observed rate differs from its planned rate by more
than `threshold` (relative), once there is enough evidence (`min_count` arrivals observed or expected);
`replan` re-runs the placement's strategy with the new demands, keeping the device sets of models
whose rate stayed within the threshold (a `Replan` says which were kept, moved, added, removed).
`serving.sim.simulator.simulate_replanning` drives it in simulation (docs/scheduling.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from serving.scheduling.cost_model import DeviceProfile
from serving.scheduling.demand import Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.placement import Placement
from serving.scheduling.strategies import _place

DEFAULT_DRIFT_THRESHOLD = 0.5
MIN_DRIFT_OBSERVATIONS = 20


@dataclass(frozen=True)
class RateObservation:
    rate: float       # requests / s over the window
    count: int        # arrivals seen in the window
    window_s: float


@dataclass
class RatesMonitor:
    """Arrivals per model in a sliding window."""

    window_s: float = 60.0
    start_s: float | None = None      # when observation began (default: the first arrival)
    _arrivals: dict[str, deque] = field(default_factory=dict, init=False, repr=False)

    def record(self, model: str, t: float) -> None:
        if self.start_s is None:
            self.start_s = t
        q = self._arrivals.setdefault(model, deque())
        q.append(t)
        while q and q[0] <= t - self.window_s:
            q.popleft()

    def observe(self, now: float, models: Iterable[str] = ()) -> dict[str, RateObservation]:
        """Rates over the last window (shorter while observation has run for less than a window);
        `models` adds zero-arrival entries for models not seen."""
        start = now if self.start_s is None else self.start_s
        window = min(self.window_s, max(now - start, 0.0))
        out = {}
        for m in dict.fromkeys([*self._arrivals, *models]):
            count = sum(1 for t in self._arrivals.get(m, ()) if now - self.window_s < t <= now)
            out[m] = RateObservation(count / window if window > 0 else 0.0, count, window)
        return out


def rate_drift(plan: Placement | Mapping[str, float], observed: Mapping[str, float | RateObservation],
               threshold: float = DEFAULT_DRIFT_THRESHOLD, min_count: int = MIN_DRIFT_OBSERVATIONS) -> dict[str, float]:
    """Models whose observed rate is off their planned rate (by the placement, or model -> rate) by
    more than `threshold` (relative; +0.6 is 60% above plan), with enough evidence: a RateObservation
    counts once `min_count` arrivals were seen or were expected at the planned rate over its window
    (so a model that went silent is caught too). Plain floats are taken as trusted rates. Models
    not in `observed` are skipped."""
    if isinstance(plan, Placement):
        plan = {m: plan.planned_rate(m) for m in plan.demands}
    drifted = {}
    for model, planned in plan.items():
        if model not in observed:
            continue
        obs = observed[model]
        if isinstance(obs, RateObservation):
            if max(obs.count, planned * obs.window_s) < min_count:
                continue
            rate = obs.rate
        else:
            rate = float(obs)
        if planned > 0:
            drift = (rate - planned) / planned
        else:
            drift = math.inf if rate > 0 else 0.0
        if abs(drift) > threshold:
            drifted[model] = drift
    return drifted


def should_replan(placement: Placement, observed: Mapping[str, float | RateObservation],
                   threshold: float = DEFAULT_DRIFT_THRESHOLD, min_count: int = MIN_DRIFT_OBSERVATIONS) -> bool:
    return bool(rate_drift(placement, observed, threshold, min_count))


@dataclass(frozen=True)
class Replan:
    placement: Placement
    kept: tuple[str, ...]       # on the same device sets as before
    moved: tuple[str, ...]      # served before and now, on different device sets
    added: tuple[str, ...]
    removed: tuple[str, ...]
    full_replan: bool           # keeping models in place made the rest infeasible


def replan(placement: Placement, demands: Sequence[ModelDemand], profile: DeviceProfile, *,
            threshold: float = DEFAULT_DRIFT_THRESHOLD, devices: Sequence[Device] | None = None,
            config: SchedulerConfig | None = None) -> Replan:
    """Re-run `placement`'s strategy for new demands (e.g. rates updated from a RatesMonitor). Models
    whose demand is unchanged but for a rate within `threshold` of plan keep their device sets when
    the same TP and replica count still meets their SLO and rate; the others are placed around them.
    If that is infeasible, everything is placed afresh."""
    devices = tuple(devices or placement.devices)
    config = config or placement.config
    old = placement.demands
    pinned = {}
    for d in demands:
        prev = old.get(d.name)
        if prev is None or dataclasses.replace(prev, rate=d.rate) != d:
            continue
        planned = placement.planned_rate(d.name)
        if abs(d.rate - planned) <= threshold * planned and placement.replicas_of(d.name):
            pinned[d.name] = placement.replicas_of(d.name)
    full = False
    try:
        new = _place(placement.strategy, demands, devices, profile, config, pinned)
    except PlacementError:
        if not pinned:
            raise
        new, full = _place(placement.strategy, demands, devices, profile, config, {}), True
    before = {m: sorted(r.devices for r in placement.replicas_of(m)) for m in old}
    after = {m: sorted(r.devices for r in new.replicas_of(m)) for m in new.demands}
    both = [m for m in after if m in before]
    kept = tuple(m for m in both if before[m] == after[m])
    moved = tuple(m for m in both if before[m] != after[m])
    new.notes.append(f"re-placement: kept {list(kept)}, moved {list(moved)}" + (" (full re-plan)" if full else ""))
    return Replan(new, kept, moved, tuple(m for m in after if m not in before),
                       tuple(m for m in before if m not in after), full)
