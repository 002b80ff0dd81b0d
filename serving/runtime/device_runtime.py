"""Several models on one device, each its own jitted programs, all threading one donated KV pool.

Every model has an LLMEngine (scheduler, page manager, runner with its own compiled prefill/decode
programs) over the same `KVPool`: each step takes `pool.words`, donates it to that model's program
and stores the result back, so the pool is updated in place and never copied, whichever model runs.
Each model sees the shared words through its own page geometry (kv_pages.KVPageLayout).

`step` asks the step policy which model goes next among those with work; a model whose requests are
all waiting for pages held by other models is skipped for that step. Before a model waits (or
preempts) for lack of pages, the other models are compacted (`reclaim_for`). `assemble_device` builds
a device from a `serving.scheduling.local_scheduling.LocalScheduling`: its engines with their
admission policies and this reclaim hook, and the step policy (round-robin by default).

A model whose step raises is isolated: `step` raises ModelStepError naming it, and `recover` fails
only that model's requests; the other models keep their requests (and, unless the failed program
took the donated pool with it, their cached KV). Design notes: docs/serving.md, docs/kv_slab.md.

A runtime may also hold a device group: the pools of several devices, each model on one member's
pool or, tensor parallel, on a `GroupKVPool` of several; the models still step one at a time.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.pow2 import next_pow2
from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import RequestOutput
from serving.kv.kv_pool import KVPool
from serving.scheduling.local_scheduling import LocalScheduling
from serving.scheduling.step_policy import RoundRobin, StepTimes

class ModelStepError(RuntimeError):
    """One model's step raised; the cause is chained. The runtime is intact: call `recover(model)`."""

    def __init__(self, model: str):
        super().__init__(f"model {model!r} failed during its step")
        self.model = model


class StepPolicy(Protocol):
    def pick(self, ready: list[str]) -> str:
        """The model to step next, among those with unfinished requests (in registration order)."""


def pool_members(pool) -> list:
    """The device pools a model's pool is made of (a `GroupKVPool`'s members, or itself)."""
    return list(getattr(pool, "members", [pool]))


def _shares_a_device(a, b) -> bool:
    return any(x is y for x in pool_members(a) for y in pool_members(b))


class DeviceRuntime:
    def __init__(self, pool: KVPool | Sequence[KVPool], engines: dict[str, LLMEngine],
                 policy: StepPolicy | None = None, step_seconds: StepTimes | None = None):
        """pool: the device's pool, or a device group's pools (in device order). step_seconds: where
        each model's step times are kept (shared with a latency-aware policy)."""
        self.pools = list(pool) if isinstance(pool, (list, tuple)) else [pool]
        for name, engine in engines.items():
            if not all(any(m is p for p in self.pools) for m in pool_members(engine.pool)):
                raise ValueError(f"engine {name!r} does not use this runtime's pool")
        self.pool = self.pools[0]
        self.engines = engines
        self.policy = policy or RoundRobin(list(engines))
        self.pages_moved = 0
        self.step_seconds = step_seconds if step_seconds is not None else StepTimes()

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines.values())

    def step(self) -> list[tuple[str, RequestOutput]]:
        """Step one model (the policy's pick among those that can run); its outputs, tagged."""
        ready = [name for name, e in self.engines.items() if e.has_unfinished_requests()]
        while ready:
            name = self.policy.pick(ready)
            engine = self.engines[name]
            steps, start = engine.stats.steps, engine.clock()
            try:
                outputs = engine.step()
            except Exception as e:
                raise ModelStepError(name) from e
            if engine.stats.steps > steps:
                self.step_seconds.observe(name, engine.clock() - start)
            if not engine.blocked:
                return [(name, out) for out in outputs]
            ready.remove(name)  # waiting for pages other models hold; try the next one
        if self.has_unfinished_requests():
            # A blocked model holds no pages (it preempts its own sequences first), so if every
            # model is blocked the pool is empty and this cannot happen.
            raise RuntimeError("every model with requests is waiting for KV pages")
        return []

    def recover(self, name: str) -> list[RequestOutput]:
        """After `name`'s step raised: finish all its requests with reason "error" (their pages
        return to the pool) and return their final outputs. If the failed program had been given
        the donated pool, the buffer is gone: allocate a new one, send every other model's running
        sequences back to its queue, to be recomputed, and empty every prefix cache on it (their KV
        was in the lost buffer)."""
        failed = self.engines[name].abort_all("error")
        lost = [p for p in self.pools if p.words is not None and p.words.is_deleted()]
        for pool in lost:
            pool.words = jax.device_put(jnp.zeros(pool.words.shape, pool.words.dtype), pool.words.sharding)
        for engine in self.engines.values():
            if any(_shares_a_device(engine.pool, pool) for pool in lost):
                engine.preempt_all()
                engine.pages.evict(engine.pages.num_idle_cached)   # the cached KV was in the lost buffer
        return failed

    def reclaim_for(self, name: str) -> bool:
        """`name` is short of pages: every other model on its devices evicts its idle cached pages
        (prefix cache), then those holding more slabs than their pages need (free pages stranded in
        their slabs) are compacted, so the emptied slabs serve `name`. Moves pages on the device and
        renames them in the owners' page tables."""
        freed = False
        mine = self.engines[name].pool
        for other, engine in self.engines.items():
            if other == name or not _shares_a_device(mine, engine.pool):
                continue
            freed |= engine.pages.evict(engine.pages.num_idle_cached) > 0
            allocator = engine.pool.allocator
            if not allocator.reclaimable_slabs(other):
                continue
            moves = allocator.compact(other)
            if moves:
                n = next_pow2(len(moves))  # few compiled shapes
                src = np.zeros(n, np.int32)
                dst = np.full(n, -1, np.int32)
                src[:len(moves)] = list(moves)
                dst[:len(moves)] = list(moves.values())
                if engine.pool.words is not None:  # None: a simulated pool (allocator only)
                    engine.pool.copy_pages(engine.layout, src, dst)
                engine.rename_pages(moves)
                self.pages_moved += len(moves)
            freed = True
        return freed

    def run_until_done(self):
        """Step until every model is idle; yields (model, output) as outputs are produced."""
        while self.has_unfinished_requests():
            yield from self.step()

    def pool_stats(self) -> dict:
        """The allocators' `stats()` summed over the runtime's pools: bytes over all devices, and a
        model's slabs and pages over the devices it lives on (a tensor-parallel model's page is one
        page slot on each member, of its `page_bytes` each)."""
        per_pool = [p.allocator.stats() for p in self.pools]
        if len(per_pool) == 1:
            return per_pool[0]
        total = {key: sum(st[key] for st in per_pool) for key in
                 ("pool_bytes", "free_slabs", "free_bytes", "live_kv_bytes", "stranded_bytes", "slab_tail_bytes")}
        models: dict[str, dict] = {}
        for st in per_pool:
            for name, m in st["models"].items():
                if name not in models:
                    models[name] = dict(m)
                else:
                    for key in ("slabs", "used_pages", "free_pages"):
                        models[name][key] += m[key]
        return {**total, "slab_bytes": per_pool[0]["slab_bytes"],
                "used_pages": {name: m["used_pages"] for name, m in models.items()},
                "external_fragmentation": total["stranded_bytes"] / total["pool_bytes"], "models": models}

    def cached_pages(self, name: str) -> int:
        """`name`'s idle cached pages, counted as `pool_stats` counts pages: on every device it
        lives on (a tensor-parallel page is a slot in each member's pool)."""
        engine = self.engines[name]
        return engine.pages.num_idle_cached * len(pool_members(engine.pool))

    def memory_stats(self) -> dict:
        """Where the pool's bytes are, down to the token: `kv_bytes` hold cached tokens of live
        sequences (a page they share counted once); `page_tail_bytes` are allocated pages past their
        sequence's last token; `page_padding_bytes` pad pages to a common size (single-page baseline
        only); `prefix_cache_bytes` are idle cached pages (no sequence holds them; evicted first); the
        allocator's `stranded_bytes`, `slab_tail_bytes` and `free_bytes` make up the rest.
        `tokens_per_kv_byte` is FineServe's memory efficiency per model: cached tokens per byte of
        the slabs it holds. Over a device group, bytes are summed over the devices (`pool_stats`)."""
        stats = self.pool_stats()
        slab = stats["slab_bytes"]
        kv = page_tail = padding = cache = 0
        models = {}
        for name, engine in self.engines.items():
            layout = engine.layout
            live = engine.live_sequences()
            members = len(pool_members(engine.pool))   # a TP model: every device
            tokens = _tokens_in_pages(live, layout.tokens_per_page)
            cached = self.cached_pages(name)
            pages = stats["models"][name]["used_pages"] - cached
            kv_m = tokens * layout.bytes_per_token * members
            kv += kv_m
            cache += cached * layout.page_bytes
            page_tail += pages * layout.page_bytes - kv_m
            padding += (pages + cached) * (layout.page_slot_bytes - layout.page_bytes)
            held = stats["models"][name]["slabs"] * slab
            models[name] = {"sequences": len(live), "tokens": tokens, "kv_bytes": kv_m, "pages": pages,
                            "cached_pages": cached,
                            "slabs": stats["models"][name]["slabs"],
                            "tokens_per_kv_byte": tokens / held if held else 0.0}
        pool = stats["pool_bytes"]
        accounted = (kv + page_tail + padding + cache + stats["stranded_bytes"] + stats["slab_tail_bytes"]
                     + stats["free_bytes"])
        assert accounted == pool, (accounted, pool)
        return {
            "pool_bytes": pool,
            "kv_bytes": kv,
            "kv_share": kv / pool,
            "page_tail_bytes": page_tail,
            "page_padding_bytes": padding,
            "prefix_cache_bytes": cache,
            "stranded_bytes": stats["stranded_bytes"],
            "slab_tail_bytes": stats["slab_tail_bytes"],
            "free_bytes": stats["free_bytes"],
            "internal_fragmentation": (page_tail + padding + stats["slab_tail_bytes"]) / pool,
            "external_fragmentation": stats["external_fragmentation"],
            "sequences": sum(m["sequences"] for m in models.values()),
            "models": models,
        }


def _tokens_in_pages(seqs, tokens_per_page: int) -> int:
    """Tokens cached in the pages these sequences hold, a page shared by several (prefix cache)
    counted once."""
    filled: dict[int, int] = {}
    for s in seqs:
        for i, page in enumerate(s.pages):
            in_page = min(tokens_per_page, max(0, s.num_computed - i * tokens_per_page))
            filled[page] = max(filled.get(page, 0), in_page)
    return sum(filled.values())


def assemble_device(pool: KVPool | Sequence[KVPool], engines: Mapping[str, Callable[..., LLMEngine]],
                    scheduling: LocalScheduling | None = None) -> DeviceRuntime:
    """One device: each model's engine, made by its factory (e.g. a `partial(LLMEngine, ...)` over
    `pool`) given its admission policy and the runtime's reclaim hook, and the runtime stepping them
    by `scheduling`'s step policy. The Fleet and the simulator both build devices this way."""
    scheduling = scheduling or LocalScheduling()
    runtime: DeviceRuntime | None = None  # assigned below, before any engine can step and reclaim

    def reclaim(name: str) -> bool:
        return runtime.reclaim_for(name)

    built = {name: make(admission=scheduling.admission_for(name), reclaim=partial(reclaim, name))
             for name, make in engines.items()}
    step_seconds = StepTimes()
    runtime = DeviceRuntime(pool, built, scheduling.policy_for(built, step_seconds), step_seconds)
    return runtime
