"""The KV pools of a tensor-parallel group, seen by one model as one pool.

A model split over tp devices keeps its kv heads d*Hkv/tp.. on device d, in that device's own pool,
which it shares with whatever else runs there (TP=1 models, other groups). One page table serves
every member, so the model's page p must be the same slab and slot on each: `GroupSlabAllocator`
mirrors every allocation, free and compaction on the members' allocators and formats only slabs
free on all of them (in the same order everywhere), so the members' views of the model stay
identical. `GroupKVPool.words` joins the members' buffers, without a copy, into one array sharded
over the group's mesh (`[tp * num_slabs, slab_words]`, row block d on device d) for the model's
jitted step, which donates it; assigning the result hands each member its buffer back.
"""

from __future__ import annotations

from functools import partial

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.tensor_parallel import TP_AXIS
from pallas_kernels.kv_pages import KVPageLayout, copy_pages
from serving.kv.kv_pool import KVPool
from serving.kv.slab_allocator import PoolExhausted, SlabAllocator


class GroupSlabAllocator:
    """The members' allocators acting as one for the group's models (SlabAllocator's interface as
    the engine uses it). A model registered here must only be allocated through here."""

    def __init__(self, members: list[SlabAllocator]):
        if len({(a.num_slabs, a.slab_bytes) for a in members}) != 1:
            raise ValueError("the pools of a tensor-parallel group must have the same slabs on every device")
        self.members = members

    def register(self, model: str, page_bytes: int, *, min_slabs: int = 0, max_slabs: int | None = None) -> int:
        for i, a in enumerate(self.members):
            try:
                pages_per_slab = a.register(model, page_bytes, min_slabs=min_slabs, max_slabs=max_slabs)
            except ValueError:
                for done in self.members[:i]:
                    done.unregister(model)
                raise
        return pages_per_slab

    def pages_per_slab(self, model: str) -> int:
        return self.members[0].pages_per_slab(model)

    def _common_free_slabs(self) -> list[int]:
        return sorted(set.intersection(*(a.free_slab_ids() for a in self.members)))

    def num_free_pages(self, model: str) -> int:
        first = self.members[0]   # the model's formatted slabs are the same on every member
        fresh = min([len(self._common_free_slabs())] + [a.fresh_slabs_for(model) for a in self.members])
        return first.free_pages_in_slabs(model) + fresh * first.pages_per_slab(model)

    def capacity_pages(self, model: str) -> int:
        return min(a.capacity_pages(model) for a in self.members)

    def used_pages(self, model: str) -> int:
        return self.members[0].used_pages(model)

    def used_pages_of_others(self, model: str) -> int:
        return sum(a.used_pages_of_others(model) for a in self.members)

    def allocate(self, model: str, n: int) -> list[int]:
        if n > self.num_free_pages(model):
            raise PoolExhausted(f"{model}: {n} pages requested, {self.num_free_pages(model)} free on every "
                                "device of its group")
        fresh = self._common_free_slabs()
        pages = [a.allocate(model, n, fresh_slabs=fresh) for a in self.members]
        assert all(p == pages[0] for p in pages), "the group's allocators diverged"
        return pages[0]

    def free(self, model: str, pages: list[int]) -> None:
        for a in self.members:
            a.free(model, pages)

    def reclaimable_slabs(self, model: str) -> int:
        return self.members[0].reclaimable_slabs(model)

    def compact(self, model: str) -> dict[int, int]:
        moves = [a.compact(model) for a in self.members]
        assert all(m == moves[0] for m in moves), "the group's allocators diverged"
        return moves[0]


class GroupKVPool:
    """The pools of a tensor-parallel group's devices (in mesh order) as one model sees them."""

    def __init__(self, members: list[KVPool], mesh: Mesh):
        devices = list(mesh.devices.flat)
        if len(members) != len(devices):
            raise ValueError(f"a mesh of {len(devices)} devices needs as many pools, got {len(members)}")
        for pool, device in zip(members, devices):
            if pool.words.devices() != {device}:
                raise ValueError(f"pool on {pool.words.devices()} given for mesh device {device}")
        self.members = members
        self.mesh = mesh
        self.allocator = GroupSlabAllocator([p.allocator for p in members])
        self._sharding = NamedSharding(mesh, P(TP_AXIS, None))

    @property
    def words(self) -> jax.Array:
        rows, width = self.members[0].words.shape
        return jax.make_array_from_single_device_arrays(
            (rows * len(self.members), width), self._sharding, [p.words for p in self.members])

    @words.setter
    def words(self, value: jax.Array) -> None:
        by_device = {shard.device: shard.data for shard in value.addressable_shards}
        for pool, device in zip(self.members, self.mesh.devices.flat):
            pool.words = by_device[device]

    def copy_pages(self, layout: KVPageLayout, src, dst) -> None:
        """Copy page src[i] over page dst[i] of the group's model (`layout`: one device's) on every
        member, in place."""
        self.words = _group_copy_pages(self.words, layout, src, dst, self.mesh)


@partial(jax.jit, static_argnums=(1, 4), donate_argnums=(0,))
def _group_copy_pages(words, layout, src, dst, mesh):
    copy = jax.shard_map(lambda w, s, d: copy_pages(w, layout, s, d), mesh=mesh,
                         in_specs=(P(TP_AXIS), P(), P()), out_specs=P(TP_AXIS), check_vma=False)
    return copy(words, src, dst)

