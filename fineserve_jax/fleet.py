"""Several models co-located on one device, sharing one KV pool: `Fleet`, `ModelSpec`, fleet.toml.

    fleet = Fleet([ModelSpec("smollm2-135m", precision="bf16"),
                   ModelSpec("smollm2-135m", precision="w4a16")], pool_bytes=256 << 20)
    fleet.generate("Hello", SamplingParams(max_tokens=16), model="smollm2-135m-w4a16")
    fleet.generate(["Hi", "Hey"], params, model=["smollm2-135m-bf16", "smollm2-135m-w4a16"])
    fleet.llm("smollm2-135m-bf16").chat(...)      # the full LLM API of one model

Each model keeps its own jitted programs; all of them thread the same donated pool
(serving/runtime/device_runtime.py), `pool_mode` picks KV Slab or one of its baselines
(serving/kv/pool_plan.py), and `scheduling=` takes a
`serving.scheduling.local_scheduling.LocalScheduling`. The same fleet from a TOML file
(`pool_bytes`, `pool_mode`, `slab_bytes`, and `[[models]]` entries of ModelSpec fields; README.md):
`Fleet.from_config("fleet.toml")`. Design notes: docs/serving.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence as Seq

import jax
from flax import nnx
from tqdm.auto import tqdm

from fineserve_jax.config_files import fleet_file, parse_bytes, read_toml
from fineserve_jax.llm import LLM, check_max_model_len, engine_config, group_devices
from models.loader import LoadedModel, check_precision, load_model, with_kv_skip_layers
from pallas_kernels.implementation import resolve_kernels
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.page_selection import SparseSpec
from models.tensor_parallel import check_tensor_parallel, check_tensor_parallel_size, local_layout, shard_model, tp_mesh
from serving.kv.group_pool import GroupKVPool
from serving.runtime.device_runtime import assemble_device
from serving.scheduling.local_scheduling import LocalScheduling
from serving.engine.llm_engine import EngineConfig, LLMEngine, pool_bytes_for_device
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES
from serving.kv.pool_plan import POOL_MODES, ModelPages, PoolPlan, plan_pool
from serving.kv.pool_sizing import check_reports_memory, check_utilization, device_memory_stats
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.http.tool_calls import TOOL_CALL_FORMATS

DEFAULT_POOL_BYTES = 512 << 20
AUTO_TP = "auto"


@dataclass
class ModelSpec:
    """One model of a fleet. `model` is anything `LLM` accepts (name, HF dir, .gguf, quantized dir),
    or an already loaded `models.loader.LoadedModel` (e.g. `random_model(...)`)."""

    model: str | LoadedModel
    precision: str = "auto"
    name: str | None = None             # the name requests use; default "<model>-<precision>"
    kv_dtype: str | None = None
    kv_skip_layers: tuple[int, ...] | None = None  # layers whose KV stays in the model dtype (see LLM)
    dtype: str = "bfloat16"
    calib_samples: int = 8
    tokens_per_page: int = 16
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_num_batched_tokens: int = 512
    kv_reserve_bytes: int = 0           # KV memory only this model may use
    kv_max_bytes: int | None = None     # cap on this model's KV memory
    kv_share: float | None = None       # pool_mode="static": its fraction (default: equal)
    seed: int = 0
    kernels: str = "auto"               # see LLM: auto, xla, pallas, interpret
    sparse: SparseSpec | dict | None = None   # query-aware page selection, the requests' default (see LLM)
    sparse_dense_layers: int = 2
    sparse_recall_every: int = 0
    enable_prefix_caching: bool = True   # see LLM
    async_scheduling: bool = True        # see LLM
    mixed_steps: bool = True             # see LLM
    tensor_parallel_size: int | str = 1  # split over that many of the fleet's devices (see LLM, Fleet);
    # "auto": the placement's choice (`fineserve serve` over several [[devices]] or a Ray cluster)
    tool_call_parser: str | None = "hermes"  # how the server reads tool calls in tool_choice="auto"; None: no auto

    def __post_init__(self):
        check_precision(self.precision, self.kv_dtype, self.kv_skip_layers)
        if self.tensor_parallel_size != AUTO_TP:
            try:
                check_tensor_parallel_size(self.tensor_parallel_size)
            except ValueError:
                raise ValueError(f"tensor_parallel_size must be a positive integer or {AUTO_TP!r}, got "
                                 f"{self.tensor_parallel_size!r}") from None
        resolve_kernels(self.kernels)
        if self.tool_call_parser == "none":   # as a TOML file says it
            self.tool_call_parser = None
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_FORMATS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_CALL_FORMATS)} or 'none', got "
                             f"{self.tool_call_parser!r}")
        self.sparse = EngineConfig(sparse=self.sparse, sparse_dense_layers=self.sparse_dense_layers,
                                   sparse_recall_every=self.sparse_recall_every,
                                   enable_prefix_caching=self.enable_prefix_caching,
                                   async_scheduling=self.async_scheduling, mixed_steps=self.mixed_steps).sparse
        if isinstance(self.model, LoadedModel) and self.precision not in ("auto", self.model.precision.name):
            raise ValueError(f"model {self.model.name!r} is already loaded as {self.model.precision.name}; "
                             f"use precision='auto'")
        self.kv_reserve_bytes = parse_bytes(self.kv_reserve_bytes, "kv_reserve_bytes")
        if self.kv_max_bytes is not None:
            self.kv_max_bytes = parse_bytes(self.kv_max_bytes, "kv_max_bytes")
        check_max_model_len(self.max_model_len)
        if self.tokens_per_page <= 0:
            raise ValueError(f"tokens_per_page must be positive, got {self.tokens_per_page}")

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.model, LoadedModel):
            return self.model.name
        return f"{Path(str(self.model)).name}-{self.precision}"


def _members(specs: dict[str, ModelSpec], num_devices: int, given: dict[str, Seq[int]]) -> dict[str, tuple[int, ...]]:
    """Which of the group's devices each model runs on: `given`, else its first tensor_parallel_size."""
    if unknown := sorted(set(given) - set(specs)):
        raise ValueError(f"members given for models the fleet does not have: {unknown}")
    members = {}
    for name, spec in specs.items():
        idx = tuple(int(i) for i in given.get(name, range(spec.tensor_parallel_size)))
        if len(idx) != spec.tensor_parallel_size or len(set(idx)) != len(idx) or not all(
                0 <= i < num_devices for i in idx):
            raise ValueError(f"{name}: members {list(idx)} must be {spec.tensor_parallel_size} distinct "
                             f"device(s) of the group's {num_devices} (indices 0..{num_devices - 1})")
        members[name] = idx
    return members


class Fleet:
    """Co-located models on one device (or a device group): one KV pool per device, one runtime
    loop, one jitted program set per model. `pool_mode`: "slab" (KV Slab), or the baselines "static" (fixed
    per-model partitions) and "single_page" (every page padded to the largest). `device` (a
    `jax.Device`; default: JAX's default device): where the models are loaded and the pool is
    allocated; pre-loaded models' weights are moved there. Weights and pool are committed to it, so
    every step runs there. `scheduling`: each model's admission and the step policy between models
    (default FCFS, round-robin). `quantized_cache`: a folder caching calibrated weights (see
    `models.quantized_cache`); `progress`: show a progress bar while loading. `pool_bytes` (default
    512 MiB) or, instead, `gpu_memory_utilization` (vLLM's: the pool takes that fraction of the
    device's memory less the weights and a step's activations, measured after loading;
    `serving.kv.pool_sizing`).
    A model with `tensor_parallel_size` N > 1 makes the fleet a device group: `device` and the next
    devices of `jax.devices()` (N in all, for the widest model), or the devices `device` lists, each
    with a pool of the same plan (pool_bytes is per device). `members` says which of the group's
    devices (indices) each model runs on, N of them (default: a TP model the first N, the others the
    first); a TP model keeps its kv heads in each member's pool, beside the models that run on that
    device alone (docs/models.md, docs/kv_slab.md)."""

    def __init__(self, models: Seq[ModelSpec], pool_bytes: int | str | None = None, *,
                 pool_mode: str = "slab", slab_bytes: int | str = DEFAULT_SLAB_BYTES,
                 scheduling: LocalScheduling | None = None, pool_fill: int = 0,
                 device: jax.Device | Seq[jax.Device] | None = None, members: dict[str, Seq[int]] | None = None,
                 quantized_cache: str | Path | None = None, progress: bool = False,
                 gpu_memory_utilization: float | None = None):
        specs = list(models)
        if not specs or not all(isinstance(s, ModelSpec) for s in specs):
            raise ValueError("a Fleet needs a non-empty list of ModelSpec")
        names = [s.served_name for s in specs]
        if auto := [n for n, s in zip(names, specs) if s.tensor_parallel_size == AUTO_TP]:
            raise ValueError(f"{', '.join(auto)}: tensor_parallel_size='auto' is the placement's choice (fineserve "
                             f"serve over several [[devices]] or a Ray cluster); a Fleet needs a number")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}; set ModelSpec(name=...)")
        if pool_mode not in POOL_MODES:
            raise ValueError(f"unknown pool_mode {pool_mode!r}; choose one of {POOL_MODES}")
        if gpu_memory_utilization is not None:
            check_utilization(gpu_memory_utilization)
        if pool_bytes is not None or gpu_memory_utilization is None:
            pool_bytes = parse_bytes(DEFAULT_POOL_BYTES if pool_bytes is None else pool_bytes, "pool_bytes")
        slab_bytes = parse_bytes(slab_bytes, "slab_bytes")
        self.specs = dict(zip(names, specs))
        if device is None or isinstance(device, jax.Device):
            self.devices = group_devices(max(s.tensor_parallel_size for s in specs), device)
        else:
            self.devices = list(device)
        self.members = _members(self.specs, len(self.devices), members or {})
        self.device = device if len(self.devices) == 1 and not isinstance(device, Seq) else self.devices[0]
        if pool_bytes is None:  # sized from the devices' memory: fail before loading anything if it cannot be
            for d in self.devices:
                check_reports_memory(device_memory_stats(d or jax.devices()[0]))
        self.loaded: dict[str, LoadedModel] = {}
        with jax.default_device(self.device) if self.device is not None else contextlib.nullcontext():
            for name, spec in tqdm(self.specs.items(), desc="loading models", unit="model", disable=not progress):
                self.loaded[name] = with_kv_skip_layers(spec.model, spec.kv_skip_layers) if isinstance(
                    spec.model, LoadedModel) else load_model(
                    spec.model, spec.dtype, spec.precision, kv_dtype=spec.kv_dtype,
                    calib_samples=spec.calib_samples, quantized_cache=quantized_cache,
                    kv_skip_layers=spec.kv_skip_layers)
        for name, loaded in self.loaded.items():
            check_tensor_parallel(loaded.config, self.specs[name].tensor_parallel_size)
        for name, loaded in self.loaded.items():   # commit the weights (no copy for those already there)
            on = [self.devices[i] for i in self.members[name]]
            if len(on) > 1:   # only its shards stay, one per device
                shard_model(loaded.model, tp_mesh(on))
            elif on[0] is not None:
                nnx.update(loaded.model, jax.device_put(nnx.state(loaded.model), on[0]))
        if pool_bytes is None:
            pool_bytes = self._pool_bytes_for(gpu_memory_utilization)
        self.plan: PoolPlan = plan_pool(
            {name: ModelPages(self._layout(name), self.specs[name].kv_reserve_bytes,
                              self.specs[name].kv_max_bytes, self.specs[name].kv_share)
             for name in self.specs}, pool_bytes, pool_mode, slab_bytes)
        self.pools = [self.plan.build(d, fill=pool_fill, models=self._hosted_on(i))
                      for i, d in enumerate(self.devices)]
        self.pool = self.pools[0]
        engines = {}
        for name, spec in self.specs.items():
            loaded, idx = self.loaded[name], self.members[name]
            pool = self.pools[idx[0]] if len(idx) == 1 else GroupKVPool(
                [self.pools[i] for i in idx], tp_mesh([self.devices[i] for i in idx]))
            engines[name] = partial(LLMEngine, loaded.model, self.plan.layouts[name], pool, name,
                                    self._engine_config(name), tokenizer=loaded.tokenizer,
                                    eos_token_ids=loaded.eos_token_ids)
        self.runtime = assemble_device(self.pools, engines, scheduling)
        engines = self.runtime.engines
        self._outbox: dict[str, list[RequestOutput]] = {name: [] for name in engines}
        self._views = {name: LLM.over_engine(name, self.loaded[name], engines[name],
                                             lambda name=name: self._step_for(name))
                       for name in engines}

    def _hosted_on(self, index: int) -> list[str]:
        """The models that run on the group's device `index` (alone or as a TP member)."""
        return [name for name in self.specs if index in self.members[name]]

    def _pool_bytes_for(self, utilization: float) -> int:
        """The pools' size (the same on every device of the group) from each device's memory once the
        weights are loaded, less the scratch memory of the largest step of the models there (XLA's
        analysis of that program): the smallest of the devices' answers."""
        return min(pool_bytes_for_device(d or jax.devices()[0], utilization, (
            (self.loaded[name].model, self._layout(name), self._engine_config(name)) for name in self._hosted_on(i)))
            for i, d in enumerate(self.devices) if self._hosted_on(i))

    def _engine_config(self, name: str) -> EngineConfig:
        spec = self.specs[name]
        return engine_config(self.loaded[name].config, max_num_seqs=spec.max_num_seqs,
                             max_model_len=spec.max_model_len, max_num_batched_tokens=spec.max_num_batched_tokens,
                             seed=spec.seed, kernels=spec.kernels, sparse=spec.sparse,
                             sparse_dense_layers=spec.sparse_dense_layers,
                             sparse_recall_every=spec.sparse_recall_every,
                             enable_prefix_caching=spec.enable_prefix_caching,
                             async_scheduling=spec.async_scheduling, mixed_steps=spec.mixed_steps)

    def _layout(self, name: str) -> KVPageLayout:
        """The model's page on each of its devices (a TP model's: its share of the kv heads)."""
        spec = self.specs[name]
        layout = self.loaded[name].kv_layout(spec.tokens_per_page, key_bounds=spec.sparse is not None)
        return local_layout(layout, spec.tensor_parallel_size)

    @classmethod
    def from_config(cls, path: str | Path, **overrides) -> Fleet:
        """A fleet from a TOML file (see the module docstring); unknown keys are errors."""
        return cls.from_dict(read_toml(path, "fleet config"), source=path, **overrides)

    @classmethod
    def from_dict(cls, data: dict, *, source: str | Path | None = None, **overrides) -> Fleet:
        """A fleet from a fleet file's data, every key checked (config_files.FleetFile: unknown keys,
        wrong types and bad values raise ValueError naming `source`, the file, and the key);
        `overrides`: Fleet arguments that replace the file's."""
        config = fleet_file(data, ModelSpec, source)
        return cls([m.spec for m in config.models], **(config.pool() | overrides))

    # ---- serving -------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.runtime.engines)

    def llm(self, model: str) -> LLM:
        """The vLLM-style API of one model; its calls step the whole fleet."""
        if model not in self._views:
            raise ValueError(f"unknown model {model!r}; this fleet serves {self.model_names}")
        return self._views[model]

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 model: str | Seq[str], prompt_token_ids: Seq[Seq[int]] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """As `LLM.generate`, for the named model, or for one model per prompt (a list of names):
        requests for different models are in flight together and share the pool."""
        if isinstance(model, str):
            return self.llm(model).generate(prompts, sampling_params, prompt_token_ids=prompt_token_ids,
                                            use_tqdm=use_tqdm)
        models = list(model)
        given = prompt_token_ids if prompts is None else prompts
        if isinstance(prompts, str) or given is None or len(models) != len(given):
            raise ValueError(f"with a list of models, pass a list of prompts, one name per prompt "
                             f"(got {len(models)} names)")
        n = len(given)
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params or SamplingParams()] * n)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        by_model: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            self.llm(m)  # unknown names fail before anything is queued
            by_model.setdefault(m, []).append(i)
        prepared = {}
        for m, idx in by_model.items():  # validate everything before queueing anything
            sub_prompts = None if prompts is None else [prompts[i] for i in idx]
            sub_ids = None if prompt_token_ids is None else [prompt_token_ids[i] for i in idx]
            prepared[m] = self._views[m]._prepare(sub_prompts, [params[i] for i in idx], sub_ids)
        groups: dict[str, list[list[str]]] = {}
        try:
            for m, requests in prepared.items():
                groups[m] = self._views[m]._add(requests)
            ours = {(m, rid) for m, g in groups.items() for group in g for rid in group}
            finished: dict[tuple[str, str], RequestOutput] = {}
            while any(self.runtime.engines[m].has_unfinished_requests() for m in groups):
                for m, out in self.runtime.step():
                    if (m, out.request_id) not in ours:
                        self._outbox[m].append(out)  # someone else's request: keep it for them
                    elif out.finished:
                        finished[(m, out.request_id)] = out
        except BaseException:
            for m, g in groups.items():
                self._views[m]._abort(g)
            raise
        results: list[RequestOutput | None] = [None] * n
        for m, idx in by_model.items():
            mine = {rid: out for (name, rid), out in finished.items() if name == m}
            for i, out in zip(idx, LLM._collect(groups[m], mine)):
                results[i] = out
        return results

    def _step_for(self, name: str) -> list[RequestOutput]:
        """Step the fleet once; this model's outputs (others' are kept for their callers)."""
        for m, out in self.runtime.step():
            self._outbox[m].append(out)
        mine, self._outbox[name] = self._outbox[name], []
        return mine

    def memory_stats(self) -> dict:
        return self.runtime.memory_stats()
