"""The fleet configuration of `fineserve serve`: which models, on which devices, with which SLOs.

    config = ServeConfig.from_toml("fleet.toml")     # or ServeConfig.demo()
    place_models(config)                              # [DeviceGroup(("gpu0",), (("llama-bf16", (0,)),)), ...]
    for df in build_fleets(config):                   # one Fleet (one shared KV pool per device) per group
        df.device_name, df.jax_device, df.fleet, df.slo_ttft_s, df.max_queue

A fleet.toml (`Fleet.from_config`) is a valid serve config; a serve config adds a `[server]` section
(host, port, drain timeout, admission, drop_hopeless, step_policy), `[[devices]]` and, per model,
`slo_ttft_ms`, `rate` and `max_queue`. SLOs default to FineServe's rule (arXiv 2509.06261) on the
device's cost profile (serving/scheduling/profiles/<kind>.json) where it covers the model. On several
devices FineServe's global placement (`serving.scheduling.strategies.place`, each model at its
tensor_parallel_size or, for "auto", the size it chooses) puts the models, from their checkpoints'
metadata only; the server runs one replica per model, and devices joined by a tensor-parallel model
form one group, served by one Fleet. Every key and the placement rules: docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from fineserve_jax.config_files import DEFAULT_RATE, DeviceConfig, ServerConfig, parse_bytes, read_toml, serve_file
from fineserve_jax.demo import demo_fleet_specs
from fineserve_jax.fleet import AUTO_TP, DEFAULT_POOL_BYTES, Fleet, ModelSpec
from models.config import ModelConfig
from models.gguf_loader import config_from_gguf_metadata, open_gguf
from models.hf_loader import read_hf_config
from models.loader import LoadedModel, check_precision, parse_dtype, resolve_model_path
from models.precision import PrecisionPreset, kv_page_layout, resolve_precision
from models.quantize import model_weight_bytes
from models.tensor_parallel import check_tensor_parallel
from serving.scheduling.cost_model import DEVICES, DeviceProfile, StepCost, roofline_step_cost, variant_key
from serving.scheduling.demand import TP_SIZES, Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.placement import Placement
from serving.scheduling.replan import replan
from serving.scheduling.slo import fineserve_slo_of
from serving.scheduling.strategies import place
from serving.kv.pool_sizing import device_memory_stats
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES

log = logging.getLogger("fineserve.config")

DEFAULT_SLO_TTFT_S = 2.0            # where no device profile covers the model
QUEUE_PER_SEQ = 4                   # default max_queue = 4 x max_num_seqs
# No step-time model: any positive cost (memory-only placement also plans for rate 0 and no SLO,
# so that only memory decides).
MEMORY_ONLY_COST = StepCost(prefill=(1e-6, 0.0, 0.0), decode=(1e-6, 0.0, 0.0, 0.0), pad_to_buckets=False)


# --------------------------------------------------------------------------------------------------
# The configuration: [server] and [[devices]] are config_files.ServerConfig / DeviceConfig; a file's
# keys, types and values are checked there (config_files.ServeFile), its models and devices here.


@dataclass
class ServedModelConfig:
    """One served model: what the Fleet loads (`spec`) and what the server plans and admits by
    (from a file: config_files.ServedModelEntry)."""

    spec: ModelSpec
    slo_ttft_s: float | None = None    # None: see slo_ttft_s()
    rate: float = DEFAULT_RATE         # expected requests / s (placement only)
    max_queue: int | None = None       # waiting requests; None: QUEUE_PER_SEQ x max_num_seqs

    def __post_init__(self):
        if self.max_queue is None:
            self.max_queue = QUEUE_PER_SEQ * self.spec.max_num_seqs

    @property
    def name(self) -> str:
        return self.spec.served_name


@dataclass
class ServeConfig:
    models: list[ServedModelConfig]
    devices: list[DeviceConfig] = field(default_factory=list)  # empty: one device, jax.devices()[0]
    # (DeviceConfig's name and jax_device default to "device<i>" and <i>, its position)
    pool_bytes: int | str | None = None    # None: DEFAULT_POOL_BYTES, unless sized by gpu_memory_utilization
    pool_mode: str = "slab"
    slab_bytes: int | str = DEFAULT_SLAB_BYTES
    server: ServerConfig = field(default_factory=ServerConfig)
    gpu_memory_utilization: float | None = None  # size pools from device memory (serving.kv.pool_sizing)

    def __post_init__(self):
        _refuse_duplicates("model name", [m.name for m in self.models], "set name = ... in [[models]]")
        self.devices = [dataclasses.replace(d, name=d.name or f"device{i}",
                                            jax_device=i if d.jax_device is None else d.jax_device)
                        for i, d in enumerate(self.devices or [DeviceConfig()])]
        _refuse_duplicates("device name", [d.name for d in self.devices])
        _refuse_duplicates("jax_device", [d.jax_device for d in self.devices], "one entry per jax device")
        if self.pool_bytes is not None:
            self.pool_bytes = parse_bytes(self.pool_bytes, "pool_bytes")
        self.slab_bytes = parse_bytes(self.slab_bytes, "slab_bytes")

    def model(self, name: str) -> ServedModelConfig:
        return next(m for m in self.models if m.name == name)

    def device(self, name: str) -> DeviceConfig:
        return next(d for d in self.devices if d.name == name)

    def device_pool_bytes(self, device: DeviceConfig) -> int | None:
        """The device's pool size as configured; None: sized from its memory (gpu_memory_utilization)."""
        if device.pool_bytes is not None or self.pool_bytes is not None:
            return device.pool_bytes if device.pool_bytes is not None else self.pool_bytes
        return None if self.gpu_memory_utilization is not None else DEFAULT_POOL_BYTES

    @classmethod
    def demo(cls) -> ServeConfig:
        """SmolLM2-135M at bf16, w8a8 and w4a16 sharing one device (bench's demo fleet); loads nothing."""
        return cls([ServedModelConfig(spec) for spec in demo_fleet_specs()])

    @classmethod
    def from_toml(cls, path: str | Path) -> ServeConfig:
        return cls.from_dict(read_toml(path, "serve config"), source=path)

    @classmethod
    def from_dict(cls, data: dict, source: str | Path | None = None) -> ServeConfig:
        """Every key is checked (config_files.ServeFile): unknown keys, wrong types and bad values raise
        ValueError naming `source` (the file) and the key; so do duplicate names and device indices
        this process does not have."""
        file = serve_file(data, ModelSpec, source)
        try:
            config = cls([ServedModelConfig(m.spec, m.slo_ttft_s, m.rate, m.max_queue) for m in file.models],
                         file.devices, server=file.server, **file.pool())
            for d in config.devices:
                _jax_device(d)  # fail at parse time on an index this process lacks
        except ValueError as e:
            raise ValueError(f"{source or file.what}: {e}") from None
        return config


def _refuse_duplicates(what: str, values: list, hint: str = "") -> None:
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"duplicate {what}s {dup}" + (f"; {hint}" if hint else ""))


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
    return device_memory_stats(_jax_device(device)).get("bytes_limit")



# --------------------------------------------------------------------------------------------------
# What placement needs to know of a model without loading it


def _planned_preset(spec: ModelSpec) -> PrecisionPreset:
    """The model's precision; "auto"/"native" are planned as bf16 (an upper bound on weight bytes)."""
    if isinstance(spec.model, LoadedModel):
        return resolve_precision(spec.model.precision, kv_skip_layers=spec.kv_skip_layers)
    preset = check_precision(spec.precision, spec.kv_dtype) or resolve_precision("bf16", spec.kv_dtype)
    return resolve_precision(preset, kv_skip_layers=spec.kv_skip_layers)


def _fixed_tp(spec: ModelSpec) -> int:
    """The model's tensor_parallel_size; 1 for "auto" before placement chose."""
    return 1 if spec.tensor_parallel_size == AUTO_TP else spec.tensor_parallel_size


def tp_choices(spec: ModelSpec, cfg: ModelConfig) -> tuple[int, ...]:
    """The TP sizes placement may give the model: its tensor_parallel_size, or for "auto" each of the
    scheduler's sizes that its heads and MLP split over evenly. ValueError naming the model when a
    fixed size does not split it."""
    if spec.tensor_parallel_size == AUTO_TP:
        return tuple(tp for tp in TP_SIZES if not any(n % tp for n in (cfg.num_heads, cfg.num_kv_heads,
                                                                          cfg.intermediate_size)))
    try:
        check_tensor_parallel(cfg, spec.tensor_parallel_size)
    except ValueError as e:
        raise ValueError(f"{spec.served_name}: {e}") from None
    return (spec.tensor_parallel_size,)


def _profile_cost(profile: DeviceProfile | None, spec: ModelSpec, tp: int | None = None) -> StepCost | None:
    """The profile's step cost of this model and precision at `tp` (default: its tensor_parallel_size),
    if it has one."""
    if profile is None or (check_precision(spec.precision, spec.kv_dtype) is None
                           and not isinstance(spec.model, LoadedModel)):
        return None  # precision decided by the checkpoint: no key to look up
    name = spec.model.name if isinstance(spec.model, LoadedModel) else str(spec.model)
    try:
        return profile.entries.get(variant_key(Path(name).name, _planned_preset(spec).name, tp or _fixed_tp(spec)))
    except ValueError:
        return None


def step_cost(model: ServedModelConfig, kind: str | None, profile: DeviceProfile | None,
              config: ModelConfig | None = None, tp: int | None = None) -> StepCost | None:
    """The model's step times at `tp` (default: its tensor_parallel_size) on devices of `kind`: the
    device profile's where it covers the model, else the roofline of a known GPU kind (`config`:
    the model's, if already read), else None."""
    tp = tp or _fixed_tp(model.spec)
    cost = _profile_cost(profile, model.spec, tp)
    if cost is None and kind in DEVICES:
        cost = roofline_step_cost(config or read_model_config(model.spec), _planned_preset(model.spec), DEVICES[kind],
                                  tp)
    return cost


def slo_ttft_s(model: ServedModelConfig, kind: str | None, profile: DeviceProfile | None = None) -> float:
    """The configured SLO, else FineServe's (`fineserve_slo`) where the device profile of `kind`
    (`profile`, if already loaded) covers the model, else DEFAULT_SLO_TTFT_S."""
    if model.slo_ttft_s is not None:
        return model.slo_ttft_s
    if profile is None and kind is not None:
        profile = DeviceProfile.shipped(kind)
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


def planned_weights(model: ServedModelConfig) -> tuple[int, jnp.dtype]:
    """The model's weight bytes as placement counts them, and its compute dtype."""
    spec, preset = model.spec, _planned_preset(model.spec)
    if isinstance(spec.model, LoadedModel):
        return model_weight_bytes(spec.model.model), spec.model.dtype
    # a float32 compute dtype doubles the unquantized weights: count all of them twice (upper bound)
    dtype = parse_dtype(spec.dtype)
    return preset.weight_bytes(read_model_config(spec)) * (2 if dtype == jnp.float32 else 1), dtype


def _demand(index: int, model: ServedModelConfig, slo: float) -> ModelDemand:
    spec, cfg, preset = model.spec, read_model_config(model.spec), _planned_preset(model.spec)
    weights, dtype = planned_weights(model)
    layout = kv_page_layout(preset, cfg, spec.tokens_per_page, dtype, key_bounds=spec.sparse is not None)
    replicated = PrecisionPreset.replicated_weight_bytes(cfg) * (2 if dtype == jnp.float32 else 1)
    # profile_model: a private key per model, so that the profile built for placement has one entry each.
    return ModelDemand(model.name, cfg, preset.name, layout.kv_dtype,
                       weights, layout.bytes_per_token, model.rate, slo,
                       tokens_per_page=spec.tokens_per_page, profile_model=f"m{index}",
                       kv_skip_layers=preset.kv_skip_layers, tp_sizes=tp_choices(spec, cfg),
                       replicated_bytes=min(replicated, weights))


# --------------------------------------------------------------------------------------------------
# Placement


class DoesNotFit(ValueError):
    """The models do not fit in the devices' memory, even placed by memory only."""


@dataclass(frozen=True)
class DeviceGroup:
    """Devices that one Fleet serves from (a KV pool on each) and which of them each of its models
    runs on: indices into `devices`, as many as the model's tensor_parallel_size. Devices joined by
    a tensor-parallel model are one group; a device whose models all run on it alone is a group of
    one. (A group of one [[devices]] entry with a TP-N model extends over that entry's jax device
    and the next N - 1: Fleet's rule for one device.)"""
    devices: tuple[str, ...]
    members: tuple[tuple[str, tuple[int, ...]], ...]   # (served model, its devices' indices), config order

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.members)


def device_groups(hosting: list[tuple[str, tuple[str, ...]]], order: list[str]) -> list[DeviceGroup]:
    """The groups of `hosting` ((model, the devices one of its replicas runs on), config order):
    devices sharing a replica are one group, in `order` (the devices' names). A model with two
    replicas in one group keeps one there (the group's one runtime would step both anyway)."""
    root = {d: d for _, devices in hosting for d in devices}

    def find(d: str) -> str:
        while root[d] != d:
            d = root[d]
        return d

    for _, devices in hosting:
        for d in devices[1:]:
            root[find(d)] = find(devices[0])
    joined: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for model, devices in hosting:
        joined.setdefault(find(devices[0]), []).append((model, devices))
    groups = []
    for hosted in joined.values():
        devices = sorted({d for _, ds in hosted for d in ds}, key=order.index)
        members = {}
        for model, ds in hosted:
            members.setdefault(model, tuple(devices.index(d) for d in ds))
        groups.append(DeviceGroup(tuple(devices), tuple(members.items())))
    return sorted(groups, key=lambda g: order.index(g.devices[0]))


def place_models(config: ServeConfig) -> list[DeviceGroup]:
    """The device groups that host models (config order). See the module docstring for the rules;
    ValueError when the models do not fit in memory."""
    if len(config.devices) == 1:   # a TP model makes that device's fleet a group of the next devices too
        return [DeviceGroup((config.devices[0].name,),
                            tuple((m.name, tuple(range(_fixed_tp(m.spec)))) for m in config.models))]
    placement = plan_placement(config)
    hosting = []
    for m in config.models:
        replicas = placement.replicas_of(m.name)
        if len(replicas) > 1:
            log.warning("%s: the placement plans %d replicas for %.3g req/s; the server runs one, on %s",
                        m.name, len(replicas), m.rate, "+".join(replicas[0].devices))
        hosting.append((m.name, replicas[0].devices))
    return device_groups(hosting, [d.name for d in config.devices])


def plan_placement(config: ServeConfig, *, rates: dict[str, float] | None = None,
                   previous: Placement | None = None, nodes: dict[str, int] | None = None) -> Placement:
    """FineServe's global placement of the config's models over its devices (each model at its
    tensor_parallel_size, or at the size placement chooses for "auto"; a TP group inside one node:
    `nodes`, device name -> node, default all on one), at their configured rates or at `rates`
    (observed ones). With `previous`, a re-placement (`serving.scheduling.replan`): models whose
    rate stayed near plan keep their devices where those are still in the config. Where the rates /
    SLOs cannot be met, the models are placed by memory only; DoesNotFit when even that does not fit."""
    rates, nodes = rates or {}, nodes or {}
    demands = [_demand(i, m, 1.0) for i, m in enumerate(config.models)]   # SLO and rate set below
    scheduler = SchedulerConfig(tp_sizes=tuple(sorted({tp for d in demands for tp in d.tp_sizes})),
                                max_num_seqs=max(m.spec.max_num_seqs for m in config.models),
                                target_slab_bytes=config.slab_bytes)
    devices = [dataclasses.replace(_scheduler_device(config, d, scheduler), node=nodes.get(d.name, 0))
               for d in config.devices]
    kinds = {d.kind for d in devices}
    kind = kinds.pop() if len(kinds) == 1 else None  # mixed kinds: one profile cannot cost them all
    profile = DeviceProfile.shipped(kind) if kind is not None else None
    demands = [dataclasses.replace(d, slo_ttft_s=slo_ttft_s(m, kind, profile), rate=rates.get(m.name, m.rate))
               for d, m in zip(demands, config.models)]
    costs = {}
    for d, m in zip(demands, config.models):
        for tp in d.tp_sizes:
            cost = step_cost(m, kind, profile, d.config, tp)
            costs[variant_key(d.profile_key, d.precision, tp)] = cost or MEMORY_ONLY_COST

    def run(demands, profile):
        if previous is None:
            return place("fineserve", demands, devices, profile, scheduler)
        return replan(previous, demands, profile, devices=devices, config=scheduler).placement

    try:
        placement = run(demands, DeviceProfile(kind or "mixed", "serve", costs))
    except PlacementError as e:
        log.warning("the expected rates / SLOs cannot be met on these devices (%s); placing by memory only", e)
        unconstrained = [dataclasses.replace(d, rate=0.0, slo_ttft_s=math.inf) for d in demands]
        memory_only = DeviceProfile("any", "memory only", {k: MEMORY_ONLY_COST for k in costs})
        try:
            placement = run(unconstrained, memory_only)
        except PlacementError as e:
            raise DoesNotFit(f"the models do not fit on the configured devices: {e}") from None
    for note in placement.notes:
        log.info("placement: %s", note)
    return placement


def _scheduler_device(config: ServeConfig, device: DeviceConfig, scheduler: SchedulerConfig) -> Device:
    """The device as the scheduler sees it: its memory less the KV pool that will be allocated there
    (the scheduler then fits weights and each model's minimum KV in what is left: conservative)."""
    memory, pool = device_memory(device), config.device_pool_bytes(device) or 0  # 0: sized after placement
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
    """The models one device (or device group) serves: their Fleet (one shared KV pool per device)
    and serving limits."""

    device_name: str          # a group's: its devices' names joined by "+"
    jax_device: jax.Device    # a group's: its first device
    fleet: Fleet
    slo_ttft_s: dict[str, float]   # served name -> TTFT SLO, seconds
    max_queue: dict[str, int]      # served name -> waiting requests allowed


def build_fleets(config: ServeConfig, quantized_cache: str | Path | None = None,
                 gpu_memory_utilization: float | None = None,
                 groups: list[DeviceGroup] | None = None) -> list[DeviceFleet]:
    """Place the models (or take `groups`) and build one Fleet per device group, its weights and
    pools on those jax devices (`Fleet(device=...)`; the server's engine thread also steps it under
    `jax.default_device(jax_device)`), calibrated weights cached in `quantized_cache` if given.
    With `gpu_memory_utilization` (the command line's, else the file's), a device whose [[devices]]
    entry gives no pool_bytes sizes its pool from its memory instead of the file's pool_bytes (a
    group's pools take the smallest size of its devices')."""
    fleets = []
    for group in place_models(config) if groups is None else groups:
        entries = [config.device(n) for n in group.devices]
        jds, kind = [_jax_device(d) for d in entries], device_kind(entries[0])
        profile = DeviceProfile.shipped(kind)
        members = dict(group.members)   # "auto" TP models get the size placement chose
        models = [dataclasses.replace(m, spec=dataclasses.replace(m.spec, tensor_parallel_size=len(members[m.name])))
                  for m in (config.model(n) for n in group.models)]
        slos = {m.name: slo_ttft_s(m, kind, profile) for m in models}
        costs = {m.name: step_cost(m, kind, profile) for m in models}
        sizes = [d.pool_bytes if gpu_memory_utilization is not None else config.device_pool_bytes(d) for d in entries]
        placed = {"device": jds[0]} if len(jds) == 1 else {"device": jds, "members": members}
        fleet = Fleet([m.spec for m in models], None if None in sizes else min(sizes),
                      gpu_memory_utilization=gpu_memory_utilization or config.gpu_memory_utilization,
                      pool_mode=config.pool_mode,
                      slab_bytes=config.slab_bytes, scheduling=config.server.scheduling(slos, costs),
                      quantized_cache=quantized_cache, progress=True, **placed)  # loads, commits, allocates there
        fleets.append(DeviceFleet("+".join(group.devices), jds[0], fleet, slos,
                                  {m.name: m.max_queue for m in models}))
    return fleets
