"""The fleet configuration of `fineserve serve`: which models, on which devices, with which SLOs.

    config = ServeConfig.from_toml("fleet.toml")     # or ServeConfig.demo()
    place_models(config)                              # {"gpu0": ["llama-bf16"], "gpu1": [...]}
    for df in build_fleets(config):                   # one Fleet (one shared KV pool) per device
        df.device_name, df.jax_device, df.fleet, df.slo_ttft_s, df.max_queue

A fleet.toml (`Fleet.from_config`) is a valid serve config; these keys are added:

    pool_bytes = "512MiB"          # each device's KV pool, unless its [[devices]] entry sets one
    [server]                       # optional; `fineserve serve --host/--port` override it
    host = "127.0.0.1"
    port = 8000
    drain_timeout_s = 30           # on shutdown, in-flight requests get this long to finish
    admission = "fcfs"             # or "saab": FineServe's SLO-aware batching where a step-cost model exists
    drop_hopeless = false          # saab: drop (503) requests that cannot meet their SLO, else run them last
    step_policy = "edf"            # which co-located model steps next: "edf" (FineServe's latency-aware
                                   # EDF), "edf_strict" (plain EDF) or "round_robin"
    [[devices]]                    # optional; default: one device, jax.devices()[0]
    name = "gpu0"                  # default "device<i>"
    jax_device = 0                 # index into jax.devices(); default: the entry's position
    kind = "h100"                  # cost-profile kind; default from the jax device ("h100", "cpu", ...)
    memory_bytes = "80GB"          # default: the jax device's memory_stats(); needed to place on 2+ devices
    pool_bytes = "16GiB"           # default: the top-level pool_bytes
    [[models]]                     # any ModelSpec field (see fleet.py), plus:
    model = "smollm2-135m"
    precision = "w4a16"
    slo_ttft_ms = 500              # TTFT SLO; default: FineServe's rule on the device profile
                                   # (serving/scheduling/profiles/<kind>.json) where it covers the model, else 2 s
    rate = 2.0                     # expected requests / s, for placement (default 1)
    max_queue = 64                 # waiting requests before the server refuses more (default 4 x max_num_seqs)

Placement (`place_models`): on one device every model goes there. On several, FineServe's global
scheduler (serving/scheduling/placement.py, strategy "fineserve", TP 1) places them from the models'
shapes (config.json / GGUF header: no weights are loaded; "auto"/"native" precision is planned as
bf16, an upper bound). Each device is offered its memory less its configured KV pool, which is
allocated whatever the models: the scheduler fits the weights, plus each model's minimum KV as
FineServe reserves it, beside the pool (slightly conservative). Its KV score counts that leftover
memory, not the fixed pools, so it guarantees a fit, not the best split of the pools.
Step costs: the device profile where it covers the model, else the roofline for a known GPU kind
(cost_model.DEVICES, which is how the h100/h200 profiles are made), else none (memory decides for
that model). When the expected rates or SLOs cannot be met, every model is placed by memory only, with
a warning logged; only a placement that does not fit in memory is an error. The server runs one replica per
model, on one device: where the scheduler plans more replicas, the first one's device is kept (logged).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from fineserve_jax.demo import demo_fleet_specs
from fineserve_jax.fleet import DEFAULT_POOL_BYTES, Fleet, ModelSpec, parse_bytes
from models.config import ModelConfig
from models.gguf_loader import config_from_gguf_metadata, open_gguf
from models.hf_loader import read_hf_config
from models.loader import LoadedModel, check_precision, parse_dtype, resolve_model_path
from models.precision import PrecisionPreset, layout_kv_dtype, resolve_precision
from models.quantize import model_weight_bytes
from pallas_kernels.kv_pages import KVPageLayout
from serving.scheduling.cost_model import DEVICES, DeviceProfile, ModelShape, StepCost, roofline_step_cost, variant_key
from serving.scheduling.demand import Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.slo import fineserve_slo_of
from serving.scheduling.strategies import place
from serving.kv.kv_pool import DEFAULT_SLAB_BYTES
from serving.scheduling.local_scheduling import LocalScheduling
from serving.scheduling.slo import SLO
from serving.scheduling.step_policy import STEP_POLICIES
from serving.kv.pool_plan import POOL_MODES

log = logging.getLogger("fineserve.config")

DEFAULT_SLO_TTFT_S = 2.0            # where no device profile covers the model
DEFAULT_RATE = 1.0                  # requests / s
QUEUE_PER_SEQ = 4                   # default max_queue = 4 x max_num_seqs
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_DRAIN_TIMEOUT_S = "127.0.0.1", 8000, 30.0
ADMISSIONS = ("saab", "fcfs")       # [server] admission; drop_hopeless picks SAAB's variant
# No step-time model: any positive cost (memory-only placement also plans for rate 0 and no SLO,
# so that only memory decides).
MEMORY_ONLY_COST = StepCost(prefill=(1e-6, 0.0, 0.0), decode=(1e-6, 0.0, 0.0, 0.0), pad_to_buckets=False)


# --------------------------------------------------------------------------------------------------
# The configuration


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    # FCFS within a model, as vLLM, and never a drop; latency-aware EDF between models, which takes
    # turns until a deadline is at risk (RESULTS.md: on the CPU demo replay it kept round-robin's
    # latencies; in simulation, under FCFS, it met more SLOs than round-robin at 3 of 5 loads and
    # had a lower or equal TTFT p99 at all 5).
    admission: str = "fcfs"
    drop_hopeless: bool = False
    step_policy: str = "edf"

    def __post_init__(self):
        if not self.host:
            raise ValueError("host must be a non-empty string")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if self.step_policy not in STEP_POLICIES:
            raise ValueError(f"step_policy must be one of {STEP_POLICIES}, got {self.step_policy!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")

    def scheduling(self, slo_ttft_s: dict[str, float], step_costs: dict[str, StepCost | None]) -> LocalScheduling:
        """One device's local scheduling under this [server] section, for its models' TTFT SLOs
        (seconds) and step costs (SAAB needs them; a model without one admits FCFS)."""
        admission = self.admission if self.admission == "fcfs" else "saab" if self.drop_hopeless else "saab-keep"
        return LocalScheduling(admission, self.step_policy, {n: SLO(s) for n, s in slo_ttft_s.items()}, step_costs)


@dataclass
class DeviceConfig:
    """One device of the pool. None fields come from the jax device when they are needed."""

    name: str
    jax_device: int | None = None      # index into jax.devices(); None: its position in ServeConfig.devices
    memory_bytes: int | str | None = None
    kind: str | None = None
    pool_bytes: int | str | None = None  # None: ServeConfig.pool_bytes

    def __post_init__(self):
        if not self.name:
            raise ValueError("a device needs a non-empty name")
        if self.jax_device is not None and self.jax_device < 0:
            raise ValueError(f"jax_device must be >= 0, got {self.jax_device}")
        if self.kind is not None and not self.kind:
            raise ValueError("kind must be a non-empty string")
        for key in ("memory_bytes", "pool_bytes"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, parse_bytes(value, key))
                if getattr(self, key) <= 0:
                    raise ValueError(f"{key} must be positive, got {value!r}")


@dataclass
class ServedModelConfig:
    """One served model: what the Fleet loads (`spec`) and what the server plans and admits by."""

    spec: ModelSpec
    slo_ttft_s: float | None = None    # None: see slo_ttft_s()
    rate: float = DEFAULT_RATE         # expected requests / s (placement only)
    max_queue: int | None = None       # waiting requests; None: QUEUE_PER_SEQ x max_num_seqs

    def __post_init__(self):
        if not isinstance(self.spec, ModelSpec):
            raise ValueError(f"spec must be a ModelSpec, got {type(self.spec).__name__}")
        if self.slo_ttft_s is not None and not (self.slo_ttft_s > 0 and math.isfinite(self.slo_ttft_s)):
            raise ValueError(f"slo_ttft_ms must be positive, got {self.slo_ttft_s * 1e3}")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a finite number >= 0 (requests / s), got {self.rate}")
        if self.max_queue is None:
            self.max_queue = QUEUE_PER_SEQ * self.spec.max_num_seqs
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")

    @property
    def name(self) -> str:
        return self.spec.served_name


@dataclass
class ServeConfig:
    models: list[ServedModelConfig]
    devices: list[DeviceConfig] = field(default_factory=list)  # empty: one device, jax.devices()[0]
    pool_bytes: int | str = DEFAULT_POOL_BYTES
    pool_mode: str = "slab"
    slab_bytes: int | str = DEFAULT_SLAB_BYTES
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self):
        if not self.models or not all(isinstance(m, ServedModelConfig) for m in self.models):
            raise ValueError("a serve config needs at least one model (ServedModelConfig / [[models]])")
        _refuse_duplicates("model name", [m.name for m in self.models], "set name = ... in [[models]]")
        self.devices = list(self.devices) or [DeviceConfig("device0", 0)]
        self.devices = [d if d.jax_device is not None else dataclasses.replace(d, jax_device=i)
                        for i, d in enumerate(self.devices)]
        _refuse_duplicates("device name", [d.name for d in self.devices])
        _refuse_duplicates("jax_device", [d.jax_device for d in self.devices], "one entry per jax device")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"unknown pool_mode {self.pool_mode!r}; choose one of {POOL_MODES}")
        self.pool_bytes = parse_bytes(self.pool_bytes, "pool_bytes")
        self.slab_bytes = parse_bytes(self.slab_bytes, "slab_bytes")

    def model(self, name: str) -> ServedModelConfig:
        return next(m for m in self.models if m.name == name)

    def device_pool_bytes(self, device: DeviceConfig) -> int:
        return device.pool_bytes if device.pool_bytes is not None else self.pool_bytes

    @classmethod
    def demo(cls) -> ServeConfig:
        """SmolLM2-135M at bf16, w8a8 and w4a16 sharing one device (bench's demo fleet); loads nothing."""
        return cls([ServedModelConfig(spec) for spec in demo_fleet_specs()])

    @classmethod
    def from_toml(cls, path: str | Path) -> ServeConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read serve config {path}: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> ServeConfig:
        """Every key is checked: unknown keys, wrong types and bad values raise ValueError naming them;
        so do device indices this process does not have."""
        _check_keys("serve config", data, {"models", "devices", "server", "pool_bytes", "pool_mode", "slab_bytes"})
        models = [_served_model(i, e) for i, e in enumerate(_tables(data, "models", required=True))]
        devices = [_device(i, e) for i, e in enumerate(_tables(data, "devices"))]
        server = data.get("server", {})
        if not isinstance(server, dict):
            raise ValueError(f"[server] must be a table, got {server!r}")
        _check_keys("[server]", server, {f.name for f in dataclasses.fields(ServerConfig)})
        server = _construct(ServerConfig, "[server]", {k: _typed(v, _SERVER_TYPES[k], f"[server] {k}")
                                                      for k, v in server.items()})
        top = {k: data[k] for k in ("pool_bytes", "slab_bytes") if k in data}
        if "pool_mode" in data:
            top["pool_mode"] = _typed(data["pool_mode"], str, "pool_mode")
        config = _construct(cls, "serve config", dict(models=models, devices=devices, server=server, **top))
        for d in config.devices:
            _jax_device(d)  # fail at parse time on an index this process lacks
        return config


def _refuse_duplicates(what: str, values: list, hint: str = "") -> None:
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"duplicate {what}s {dup}" + (f"; {hint}" if hint else ""))


# --------------------------------------------------------------------------------------------------
# Parsing helpers (TOML -> dataclasses)

_SERVE_MODEL_TYPES = {"slo_ttft_ms": float, "rate": float, "max_queue": int}
_DEVICE_TYPES = {"name": str, "jax_device": int, "memory_bytes": "bytes", "kind": str, "pool_bytes": "bytes"}
_SERVER_TYPES = {"host": str, "port": int, "drain_timeout_s": float, "admission": str, "drop_hopeless": bool,
                 "step_policy": str}
_BYTE_FIELDS = {"kv_reserve_bytes", "kv_max_bytes"}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _spec_types() -> dict[str, type | str]:
    """What TOML may give each ModelSpec field, from its annotations (`model`: a name or path)."""
    types = {}
    for name, hint in typing.get_type_hints(ModelSpec).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        types[name] = "bytes" if name in _BYTE_FIELDS else (str if LoadedModel in args else args[0])
    return types


def _typed(value, kind: type | str, where: str):
    if kind == "bytes":
        return parse_bytes(value, where)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where} must be {_TYPE_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else value


def _check_keys(where: str, entry: dict, known: set[str]) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _tables(data: dict, key: str, required: bool = False) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{key} must be an array of tables ([[{key}]] entries), got {entries!r}")
    if required and not entries:
        raise ValueError(f"the serve config needs at least one [[{key}]] entry")
    return entries


def _construct(cls, where: str, kwargs: dict):
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _served_model(i: int, entry: dict) -> ServedModelConfig:
    where = f"[[models]] entry {i}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
    spec_types = _spec_types()
    _check_keys(where, entry, set(spec_types) | set(_SERVE_MODEL_TYPES))
    if "model" not in entry:
        raise ValueError(f"{where}: needs a 'model'")
    typed = {k: _typed(v, spec_types.get(k) or _SERVE_MODEL_TYPES[k], f"{where}: {k}") for k, v in entry.items()}
    serve = {k: typed.pop(k) for k in _SERVE_MODEL_TYPES if k in typed}
    if "slo_ttft_ms" in serve:
        serve["slo_ttft_s"] = serve.pop("slo_ttft_ms") / 1e3
    spec = _construct(ModelSpec, where, typed)
    return _construct(ServedModelConfig, where, dict(spec=spec, **serve))


def _device(i: int, entry: dict) -> DeviceConfig:
    where = f"[[devices]] entry {i}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
    _check_keys(where, entry, set(_DEVICE_TYPES))
    typed = {k: _typed(v, _DEVICE_TYPES[k], f"{where}: {k}") for k, v in entry.items()}
    return _construct(DeviceConfig, where, {"name": f"device{i}", "jax_device": i} | typed)


# --------------------------------------------------------------------------------------------------
# Devices: what jax says where the config is silent


def _jax_device(device: DeviceConfig) -> jax.Device:
    available = jax.devices()
    if device.jax_device >= len(available):
        raise ValueError(f"[[devices]] {device.name!r}: jax_device {device.jax_device} does not exist; this "
                         f"process has {len(available)} jax device(s): {[str(d) for d in available]}")
    return available[device.jax_device]


def device_kind(device: DeviceConfig) -> str:
    """The configured kind, else a known GPU kind named in the jax device's kind ("NVIDIA H100 80GB
    HBM3" -> "h100"), else its platform ("cpu", "gpu", "tpu")."""
    if device.kind is not None:
        return device.kind.lower()
    jd = _jax_device(device)
    return next((k for k in DEVICES if k in jd.device_kind.lower()), jd.platform)


def device_memory(device: DeviceConfig) -> int | None:
    """The configured memory_bytes, else the jax device's bytes_limit (None where unknown, e.g. CPU)."""
    if device.memory_bytes is not None:
        return device.memory_bytes
    try:
        stats = _jax_device(device).memory_stats() or {}
    except (RuntimeError, NotImplementedError):
        stats = {}
    return stats.get("bytes_limit")


def _load_profile(kind: str) -> DeviceProfile | None:
    return DeviceProfile.shipped(kind)


# --------------------------------------------------------------------------------------------------
# What placement needs to know of a model without loading it


def _planned_preset(spec: ModelSpec) -> PrecisionPreset:
    """The model's precision; "auto"/"native" are planned as bf16 (an upper bound on weight bytes)."""
    if isinstance(spec.model, LoadedModel):
        return spec.model.precision
    return check_precision(spec.precision, spec.kv_dtype) or resolve_precision("bf16", spec.kv_dtype)


def _profile_cost(profile: DeviceProfile | None, spec: ModelSpec) -> StepCost | None:
    """The profile's step cost of this model and precision (tp 1), if it has one."""
    if profile is None or (check_precision(spec.precision, spec.kv_dtype) is None
                           and not isinstance(spec.model, LoadedModel)):
        return None  # precision decided by the checkpoint: no key to look up
    name = spec.model.name if isinstance(spec.model, LoadedModel) else str(spec.model)
    try:
        return profile.entries.get(variant_key(Path(name).name, _planned_preset(spec).name))
    except ValueError:
        return None


def step_cost(model: ServedModelConfig, kind: str | None, profile: DeviceProfile | None,
              shape: ModelShape | None = None) -> StepCost | None:
    """The model's step times on a device of `kind`: the device profile's where it covers the model,
    else the roofline of a known GPU kind (`shape`: the model's, if already read), else None."""
    cost = _profile_cost(profile, model.spec)
    if cost is None and kind in DEVICES:
        shape = shape or ModelShape.from_config(read_model_config(model.spec), model.name)
        cost = roofline_step_cost(shape, _planned_preset(model.spec), DEVICES[kind])
    return cost


def slo_ttft_s(model: ServedModelConfig, kind: str | None, profile: DeviceProfile | None = None) -> float:
    """The configured SLO, else FineServe's (`fineserve_slo`) where the device profile of `kind`
    (`profile`, if already loaded) covers the model, else DEFAULT_SLO_TTFT_S."""
    if model.slo_ttft_s is not None:
        return model.slo_ttft_s
    if profile is None and kind is not None:
        profile = _load_profile(kind)
    cost = _profile_cost(profile, model.spec)
    return fineserve_slo_of(cost) if cost is not None else DEFAULT_SLO_TTFT_S


def read_model_config(spec: ModelSpec) -> ModelConfig:
    """The architecture from the checkpoint's metadata only (config.json, GGUF header, fineserve
    metadata): no weights are read."""
    if isinstance(spec.model, LoadedModel):
        return spec.model.config
    path = resolve_model_path(spec.model)
    if path.is_file():
        return config_from_gguf_metadata(open_gguf(path))
    if (path / "fineserve_model.json").is_file():
        return ModelConfig.from_dict(json.loads((path / "fineserve_model.json").read_text())["config"])
    return read_hf_config(path)


def _demand(index: int, model: ServedModelConfig, slo: float) -> ModelDemand:
    spec, cfg, preset = model.spec, read_model_config(model.spec), _planned_preset(model.spec)
    if isinstance(spec.model, LoadedModel):
        weights, dtype = model_weight_bytes(spec.model.model), spec.model.dtype
    else:  # a float32 compute dtype doubles the unquantized weights: count all of them twice (upper bound)
        dtype = parse_dtype(spec.dtype)
        weights = preset.weight_bytes(cfg) * (2 if dtype == jnp.float32 else 1)
    layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, spec.tokens_per_page,
                          layout_kv_dtype(preset, dtype))
    # profile_model: a private key per model, so that the profile built for placement has one entry each.
    return ModelDemand(model.name, ModelShape.from_config(cfg, f"m{index}"), preset.name, layout.kv_dtype,
                       weights, -(-layout.page_bytes // spec.tokens_per_page), model.rate, slo,
                       tokens_per_page=spec.tokens_per_page, profile_model=f"m{index}")


# --------------------------------------------------------------------------------------------------
# Placement


def place_models(config: ServeConfig) -> dict[str, list[str]]:
    """Device name -> the served models it hosts (config order; every device listed, maybe empty).
    See the module docstring for the rules; ValueError when the models do not fit in memory."""
    if len(config.devices) == 1:
        return {config.devices[0].name: [m.name for m in config.models]}
    scheduler = SchedulerConfig(tp_sizes=(1,), max_num_seqs=max(m.spec.max_num_seqs for m in config.models),
                                target_slab_bytes=config.slab_bytes)
    devices = [_scheduler_device(config, d, scheduler) for d in config.devices]
    kinds = {d.kind for d in devices}
    kind = kinds.pop() if len(kinds) == 1 else None  # mixed kinds: one profile cannot cost them all
    profile = _load_profile(kind) if kind is not None else None
    demands = [_demand(i, m, slo_ttft_s(m, kind, profile)) for i, m in enumerate(config.models)]
    costs = {}
    for d, m in zip(demands, config.models):
        costs[variant_key(d.profile_key, d.precision)] = step_cost(m, kind, profile, d.shape) or MEMORY_ONLY_COST
    try:
        placement = place("fineserve", demands, devices, DeviceProfile(kind or "mixed", "serve", costs), scheduler)
    except PlacementError as e:
        log.warning("the expected rates / SLOs cannot be met on these devices (%s); placing by memory only", e)
        unconstrained = [dataclasses.replace(d, rate=0.0, slo_ttft_s=math.inf) for d in demands]
        memory_only = DeviceProfile("any", "memory only", {k: MEMORY_ONLY_COST for k in costs})
        try:
            placement = place("fineserve", unconstrained, devices, memory_only, scheduler)
        except PlacementError as e:
            raise ValueError(f"the models do not fit on the configured devices: {e}") from None
    for note in placement.notes:
        log.info("placement: %s", note)
    hosts = {d.name: [] for d in config.devices}
    for m in config.models:
        replicas = placement.replicas_of(m.name)
        first = replicas[0].devices[0]
        if len(replicas) > 1:
            log.warning("%s: the placement plans %d replicas for %.3g req/s; the server runs one, on %s",
                        m.name, len(replicas), m.rate, first)
        hosts[first].append(m.name)
    return hosts


def _scheduler_device(config: ServeConfig, device: DeviceConfig, scheduler: SchedulerConfig) -> Device:
    """The device as the scheduler sees it: its memory less the KV pool that will be allocated there
    (the scheduler then fits weights and each model's minimum KV in what is left: conservative)."""
    memory, pool = device_memory(device), config.device_pool_bytes(device)
    if memory is None:
        raise ValueError(f"device {device.name!r}: its memory is unknown (jax reports none); set memory_bytes "
                         f"in its [[devices]] entry to place models on several devices")
    left = memory - math.ceil(pool / scheduler.memory_fraction)
    if left <= 0:
        raise ValueError(f"device {device.name!r}: its KV pool ({pool} bytes) does not fit in "
                         f"{scheduler.memory_fraction:.0%} of its memory ({memory} bytes)")
    return Device(device.name, device_kind(device), left)


# --------------------------------------------------------------------------------------------------
# Building


@dataclass
class DeviceFleet:
    """The models one device serves: their Fleet (one shared KV pool) and serving limits."""

    device_name: str
    jax_device: jax.Device
    fleet: Fleet
    slo_ttft_s: dict[str, float]   # served name -> TTFT SLO, seconds
    max_queue: dict[str, int]      # served name -> waiting requests allowed


def build_fleets(config: ServeConfig) -> list[DeviceFleet]:
    """Place the models and build one Fleet per device that hosts any, its weights and pool on that
    jax device (`Fleet(device=...)`; the server's engine thread also steps it under
    `jax.default_device(jax_device)`)."""
    placed = place_models(config)
    fleets = []
    for d in config.devices:
        names = placed[d.name]
        if not names:
            continue  # hosts nothing: no pool is allocated
        jd, kind = _jax_device(d), device_kind(d)
        profile = _load_profile(kind)
        models = [config.model(n) for n in names]
        slos = {m.name: slo_ttft_s(m, kind, profile) for m in models}
        costs = {m.name: step_cost(m, kind, profile) for m in models}
        fleet = Fleet([m.spec for m in models], config.device_pool_bytes(d), pool_mode=config.pool_mode,
                      slab_bytes=config.slab_bytes, scheduling=config.server.scheduling(slos, costs),
                      device=jd)  # loads, commits and allocates on jd
        fleets.append(DeviceFleet(d.name, jd, fleet, slos, {m.name: m.max_queue for m in models}))
    return fleets
