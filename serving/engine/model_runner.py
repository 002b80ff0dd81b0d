"""Runs one model's jitted prefill/decode programs over the shared pool, in fixed shape buckets.

Every step pads its batch to a bucket: decode `[B, 1]` with B a power of two up to max_num_seqs;
prefill `[B, S]` with S a power of two from 16 up to the prefill chunk and B * S within the token
budget; mixed, every decode row padded to `[max_batch, 1]` beside one prompt chunk `[1, S]` (S as
prefill's), sampling max_batch rows (the chunk's is the row after the decode rows). The page table
always has the width of a maximum-length sequence, so it never changes a shape. Once each bucket
has run (see `warmup`), serving compiles nothing new; `num_compilations` reports how many programs
exist. The cost model and the simulator's stand-in runner pad with the same `ShapeBuckets`, so they
see the batches the engine really runs.

The pool is donated to every step, so it is updated in place and never copied (docs/serving.md).
`dispatch` launches a step and returns at once; its `PendingStep.result()` brings the sampled tokens
to the host. The engine schedules and launches the next step in between (one step ahead): a row
whose input token is still on its way (`Sequence.num_pending`) reads it on the device from the
previous step's samples, kept padded to the largest batch.

With a mesh, the model is tensor parallel over its devices: the step runs under `shard_map`, each
device with its shard of the weights (`models.tensor_parallel`) and its own pool, laid out for its
own kv heads (`layout` is one device's); logits come back replicated.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from models.llama import LlamaForCausalLM, Segment
from models.tensor_parallel import TP_AXIS, shard_state
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.page_selection import POLICY_IDS, SelectionInputs, SparseSpec, share_budget
from pallas_kernels.paged_attention_ref import REFERENCE_PAGES_PER_BLOCK
from pallas_kernels.pow2 import next_pow2
from serving.engine.sampling import SamplerOutput, SamplingParams, build_sampling_batch, sample
from serving.engine.scheduler import StepKind
from serving.engine.structured_output import mask_width
from serving.engine.sequence import Sequence

MIN_PREFILL_BUCKET = 16
PAGES_PER_ATTENTION_BLOCK = REFERENCE_PAGES_PER_BLOCK  # page tables are whole blocks of the reference's loop


class ShapeBuckets:
    """The padded shapes a model's steps run in (see the module docstring); shared with the
    simulator's stand-in runner so simulated batches are the ones the engine forms."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, prefill_chunk: int, mixed_steps: bool = False):
        self.max_batch = next_pow2(max_num_seqs)
        self.mixed_steps = mixed_steps and self.max_batch > 1   # a chunk needs a row beside a decode row
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self._prefill_set = set(self.prefill_buckets())

    def decode_buckets(self) -> list[int]:
        return [1 << i for i in range(self.max_batch.bit_length())]

    def segment_shapes(self, kind: StepKind, batch: int, seq: int) -> list[tuple[int, int]]:
        """(rows, tokens per row) of each segment of a step in bucket (batch, seq): one, or for a
        mixed step its decode rows and its chunk of `seq` tokens."""
        return [(self.max_batch, 1), (1, seq)] if kind is StepKind.MIXED else [(batch, seq)]

    def mixed_buckets(self) -> list[int]:
        """The chunk lengths S of mixed steps (beside max_batch decode rows); none without them."""
        return sorted({s for _, s in self.prefill_buckets()}) if self.mixed_steps else []

    def prefill_buckets(self) -> list[tuple[int, int]]:
        out = []
        s = MIN_PREFILL_BUCKET
        while s <= next_pow2(self.prefill_chunk):
            b = 1
            while b <= self.max_batch and b * s <= max(self.max_num_batched_tokens, s):
                out.append((b, s))
                b *= 2
            s *= 2
        return out

    def prefill_fits(self, num_tokens: list[int]) -> bool:
        """Whether a prefill batch with these per-row token counts pads to a bucket."""
        return self.bucket_for(True, num_tokens) in self._prefill_set

    @staticmethod
    def bucket_for(is_prefill: bool, num_tokens: list[int]) -> tuple[int, int]:
        """(rows, tokens per row) of the padded step for these per-row token counts (of a mixed
        step: of its chunk)."""
        batch = next_pow2(len(num_tokens))
        seq = max(MIN_PREFILL_BUCKET, next_pow2(max(num_tokens))) if is_prefill else 1
        return batch, seq


@dataclass
class StepResult:
    sampled: np.ndarray             # int32[rows] sampled token per scheduled sequence
    logprobs: np.ndarray | None     # float32[rows]
    top_ids: np.ndarray | None      # int32[rows, K]
    top_logprobs: np.ndarray | None
    device_seconds: float           # from dispatch until results were on the host
    kv_bytes_read: int = 0          # KV bytes attention read: pages attended, and key bounds scored
    kv_bytes_dense: int = 0         # what dense attention reads for the same step
    recall_hits: int = 0            # a sampled step's selections: pages among the top by attention mass
    recall_pages: int = 0           # ... of this many selected (0: not sampled)


class CompletedStep:
    """A step whose result is already on the host (runners that stand in for the device)."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result

    def wait(self) -> None:
        pass


@dataclass
class PendingStep:
    """A launched step: its outputs are device arrays until `result()` copies them to the host."""

    runner: ModelRunner
    out: SamplerOutput
    reads: jax.Array          # (pages read, recall hits, pages selected), summed over the batch (a
                              # mixed step's decode rows)
    rows: int                 # the scheduled rows (the rest is padding)
    logprobs: bool            # some row asked for logprobs
    kv_lens: np.ndarray
    scored: bool              # page selection scored every page's key bounds
    started: float            # perf_counter at launch
    _result: StepResult | None = None

    def wait(self) -> None:
        """Wait until the device has run the step (nothing copied)."""
        jax.block_until_ready((self.out, self.reads))

    def result(self) -> StepResult:
        """Wait for the step and return its sampled tokens (and logprobs, reads); copied once."""
        if self._result is None:
            out, n = self.out, self.rows
            logprobs = top_ids = top_lp = None
            if self.logprobs:
                sampled, logprobs, top_ids, top_lp, reads = jax.device_get(
                    (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs, self.reads))
                logprobs, top_ids, top_lp = logprobs[:n], top_ids[:n], top_lp[:n]
            else:
                sampled, reads = jax.device_get((out.token_ids, self.reads))
            pages_read, hits, selected = (int(x) for x in reads)
            self._result = StepResult(sampled[:n], logprobs, top_ids, top_lp, time.perf_counter() - self.started,
                                      *self.runner.kv_bytes(pages_read, self.kv_lens, self.scored), hits, selected)
        return self._result


class ModelRunner(ShapeBuckets):
    def __init__(self, model: LlamaForCausalLM, layout: KVPageLayout, *, max_num_seqs: int,
                 max_model_len: int, max_num_batched_tokens: int, prefill_chunk: int,
                 kernels: str = "xla", sparse: SparseSpec | None = None, sparse_dense_layers: int = 2,
                 recall_every: int = 0, mesh: Mesh | None = None, mixed_steps: bool = False):
        """kernels: the implementation every kernel dispatcher gets ("xla", "pallas", "interpret").
        sparse: page selection for decode steps (the requests' default; the layout keeps key
        bounds), dense in the first `sparse_dense_layers` layers; None: off. recall_every: every
        that many decode steps, one also measures its selections' recall (a second program per
        decode bucket that reads every page: `page_selection.selection_recall`); 0: never.
        mesh: the devices of a tensor-parallel group (1-D, `TP_AXIS`); None: one device.
        mixed_steps: compile the mixed steps' programs (decode rows beside a prompt chunk)."""
        super().__init__(max_num_seqs, max_num_batched_tokens, prefill_chunk, mixed_steps)
        self.layout = layout
        self.sparse = sparse
        self.dense_layers = min(sparse_dense_layers, model.config.num_layers)
        if sparse is not None:
            sparse.check_layers(model.config.num_layers)
        self.recall_every = recall_every if sparse is not None else 0
        self._decode_steps = 0
        self.vocab_size = model.config.vocab_size
        self.num_layers = model.config.num_layers
        pages = layout.pages_for(max_model_len)
        self.table_width = -(-pages // PAGES_PER_ATTENTION_BLOCK) * PAGES_PER_ATTENTION_BLOCK
        self.tp = 1 if mesh is None else mesh.devices.size
        tp_axis = None if mesh is None else TP_AXIS
        if mesh is None:
            graphdef, self.state = nnx.split(model)
        else:
            graphdef, self.state, state_specs = shard_state(model, mesh)

        def step(state, pool, segments, selection, last_sampled, from_row, sample_index, measure_recall):
            # A row's pending input token (always its only one: a decode row, in the first segment)
            # is the previous step's sample of row from_row.
            first = segments[0]
            pending = (from_row >= 0)[:, None] & (jnp.arange(first.tokens.shape[1]) == 0)[None, :]
            tokens = jnp.where(pending, last_sampled[jnp.maximum(from_row, 0)][:, None], first.tokens)
            segments = (first._replace(tokens=tokens),) + tuple(segments[1:])
            model = nnx.merge(graphdef, state)
            hidden, pool, stats = model(segments, pool, layout, kernels=kernels, selection=selection,
                                        dense_layers=self.dense_layers, measure_recall=measure_recall,
                                        tp_axis=tp_axis)
            if sample_index is None:   # one segment: each row samples after its last new token
                last = jnp.maximum(first.num_new - 1, 0)[:, None, None]
                hidden = jnp.take_along_axis(hidden, last, axis=1)[:, 0]
            else:                      # several: the rows' last tokens, by index into the joined row
                hidden = hidden[0, sample_index]
            reads = jnp.stack([x[:first.tokens.shape[0]].sum() for x in stats])   # a mixed step's decode rows
            if tp_axis is not None:   # each device counted its own kv heads
                reads = jax.lax.psum(reads, tp_axis)
            return model.logits(hidden), pool, reads

        def forward(state, pool, segments, selection, last_sampled, from_row, sample_index=None,
                    measure_recall=False):
            args = (state, pool, segments, selection, last_sampled, from_row, sample_index)
            if mesh is None:
                return step(*args, measure_recall)
            sharded = jax.shard_map(lambda *a: step(*a, measure_recall), mesh=mesh,
                                    in_specs=(state_specs, P(TP_AXIS)) + (P(),) * 5,
                                    out_specs=(P(), P(TP_AXIS), P()), check_vma=False)
            return sharded(*args)

        self._forward = jax.jit(forward, donate_argnums=(1,), static_argnames="measure_recall")
        max_batch = self.max_batch
        self._pad_sampled = jax.jit(lambda ids: jnp.zeros((max_batch,), jnp.int32).at[:ids.shape[0]].set(ids))
        self._last_sampled = self._pad_sampled(np.zeros((1,), np.int32))   # the last step's samples, padded
        self._last_rows: dict[int, tuple[int, Sequence]] = {}   # the last step's sampling rows, by id(sequence)

    @property
    def num_compilations(self) -> int:
        return self._forward._cache_size() + sample._cache_size() + self._pad_sampled._cache_size()

    # ---- execution -----------------------------------------------------------------------------
    def execute(self, pool: jax.Array, kind: StepKind, seqs: list[Sequence], num_tokens: list[int]
                ) -> tuple[jax.Array, StepResult]:
        """Run one step and wait for it (`dispatch`, then its result)."""
        pool, step = self.dispatch(pool, kind, seqs, num_tokens)
        return pool, step.result()

    def dispatch(self, pool: jax.Array, kind: StepKind, seqs: list[Sequence], num_tokens: list[int]
                 ) -> tuple[jax.Array, PendingStep]:
        """Launch one step: seqs[i] computes its next num_tokens[i] tokens (a mixed step: seqs[:-1]
        decode one token each, seqs[-1] computes a chunk of its prompt). Returns the new pool and the
        step, whose result is a token sampled after each row's last token (the caller ignores it
        for mid-prefill rows). A row whose last token is pending must be a decode row that sampled
        it in the step launched just before this one."""
        kind = StepKind(kind)
        mixed = kind is StepKind.MIXED
        if mixed and (not self.mixed_steps or len(seqs) > self.max_batch):
            raise ValueError(f"a mixed step of {len(seqs)} rows: this runner's mixed steps take at most "
                             f"{self.max_batch if self.mixed_steps else 0}")
        parts = [(seqs[:-1], num_tokens[:-1]), (seqs[-1:], num_tokens[-1:])] if mixed else [(seqs, num_tokens)]
        shapes = self.segment_shapes(kind, *self.bucket_for(kind is not StepKind.DECODE, parts[-1][1]))
        rows = shapes[0][0]
        from_row = np.full((rows,), -1, np.int32)   # pending tokens: the first segment's rows only
        segments = tuple(self._segment(b, s, part_seqs, counts, from_row if i == 0 else None)
                         for i, ((b, s), (part_seqs, counts)) in enumerate(zip(shapes, parts)))
        sample_index = None
        if mixed:   # each decode row's one token, then the chunk's last, in the joined row
            sample_index = np.zeros((rows,), np.int32)
            sample_index[:len(seqs) - 1] = np.arange(len(seqs) - 1)
            sample_index[len(seqs) - 1] = rows + num_tokens[-1] - 1
        params = [s.params for s in seqs]
        histories = [(s.prompt_token_ids + s.output_token_ids, len(s.prompt_token_ids))
                     if s.params.uses_penalties else ((), 0) for s in seqs]
        sampling, flags = build_sampling_batch(
            params, histories, [len(s.output_token_ids) + s.num_pending for s in seqs], [s.seed for s in seqs],
            rows, self.vocab_size, token_masks=self.token_masks(seqs, num_tokens))
        first = segments[0]
        kv_lens = first.start_pos + first.num_new
        selection = None if kind is StepKind.PREFILL else self.selection_inputs(parts[0][0], kv_lens)   # decode rows
        measure = selection is not None and kind is StepKind.DECODE and self._sample_recall()
        t0 = time.perf_counter()
        logits, pool, reads = self._forward(self.state, pool, segments, selection, self._last_sampled, from_row,
                                            sample_index, measure_recall=measure)
        out: SamplerOutput = sample(logits, sampling, flags=flags)
        self._last_sampled = self._pad_sampled(out.token_ids)
        self._last_rows = {id(seq): (i, seq) for i, (seq, n) in enumerate(zip(seqs, num_tokens))
                           if seq.num_computed + n == seq.num_tokens}
        return pool, PendingStep(self, out, reads, len(seqs), any(p.logprobs is not None for p in params),
                                 kv_lens, selection is not None, t0)

    def _segment(self, rows: int, seq_len: int, seqs: list[Sequence], num_tokens: list[int],
                 from_row: np.ndarray | None) -> Segment:
        """The padded rows of `seqs` (numpy arrays); a row whose last input token is pending reads it
        from the last step's samples (`from_row`; None: no row may be pending)."""
        tokens = np.zeros((rows, seq_len), np.int32)
        start = np.zeros((rows,), np.int32)
        count = np.zeros((rows,), np.int32)
        table = np.zeros((rows, self.table_width), np.int32)
        for i, (seq, n) in enumerate(zip(seqs, num_tokens)):
            known = seq.tokens(seq.num_computed, seq.num_computed + n)
            tokens[i, :len(known)] = known
            if len(known) < n:
                row, sampler = self._last_rows.get(id(seq), (-1, None))
                if n - len(known) > 1 or sampler is not seq or from_row is None:
                    raise RuntimeError(f"request {seq.request_id}: its input tokens were not sampled by the last step")
                from_row[i] = row
            start[i] = seq.num_computed
            count[i] = n
            table[i, :len(seq.pages)] = seq.pages
        return Segment(tokens, start, count, table)

    def _sample_recall(self) -> bool:
        """Whether this decode step measures recall (every `recall_every`-th)."""
        self._decode_steps += 1
        return bool(self.recall_every) and self._decode_steps % self.recall_every == 0

    def kv_bytes(self, pages_read: int, kv_lens: np.ndarray, scored: bool) -> tuple[int, int]:
        """(KV bytes a step read, KV bytes dense attention reads) from the pages its attention read
        (over layers and kv heads), its rows' kv_lens, and whether it scored pages (then every page
        of every sparse layer had its key bounds read)."""
        layout = self.layout
        head_pages = sum(layout.pages_for(int(n)) for n in kv_lens) * layout.num_kv_heads * self.tp  # a layer
        bounds = layout.num_layers * layout.num_kv_heads * layout.bounds_words
        page_head_bytes = (layout.page_words - bounds) * 4 / (layout.num_layers * layout.num_kv_heads)
        read = pages_read * page_head_bytes
        if scored:
            read += head_pages * (self.num_layers - self.dense_layers) * layout.bounds_words * 4
        return int(read), int(head_pages * self.num_layers * page_head_bytes)

    def selection_inputs(self, seqs: list[Sequence], kv_lens: np.ndarray) -> SelectionInputs | None:
        """Each row's page selection for a decode step (its request's, else the model's default;
        padding rows dense), or None when the model selects no pages."""
        if self.sparse is None:
            return None
        batch = len(kv_lens)
        policy, gate = np.full((batch,), POLICY_IDS["full"], np.int32), np.zeros((batch,), np.int32)
        budget = np.full((batch, self.num_layers), 2, np.int32)
        for i, seq in enumerate(seqs):
            spec = seq.params.sparse or self.sparse
            policy[i], pages, gate[i] = spec.row(int(kv_lens[i]), self.layout.tokens_per_page)
            # a request's own budget without weights is shared out as the model's
            budget[i] = share_budget(pages, spec.layer_weights or self.sparse.layer_weights, self.num_layers,
                                     self.dense_layers)
        return SelectionInputs(policy, budget, gate)

    def _run_bucket(self, pool: jax.Array, kind: StepKind, batch: int, seq: int) -> tuple[jax.Array, jax.Array]:
        """The forward program of one bucket on zero inputs (page 0 of every row, nothing written);
        of a mixed step, `seq` is its chunk's length."""
        shapes = self.segment_shapes(kind, batch, seq)
        rows = shapes[0][0]
        selection = None if kind is StepKind.PREFILL else self.selection_inputs([], np.zeros((rows,), np.int32))
        args = (self.state, pool, tuple(self._zero_segment(b, s) for b, s in shapes), selection, self._last_sampled,
                np.full((rows,), -1, np.int32), np.zeros((rows,), np.int32) if kind is StepKind.MIXED else None)
        logits, pool, _ = self._forward(*args, measure_recall=False)
        if selection is not None and kind is StepKind.DECODE and self.recall_every:   # the sampled steps' program
            _, pool, _ = self._forward(self.state, pool, *args[2:], measure_recall=True)
        return logits, pool

    def _zero_segment(self, rows: int, seq_len: int) -> Segment:
        zeros = np.zeros((rows,), np.int32)
        return Segment(np.zeros((rows, seq_len), np.int32), zeros, zeros, np.zeros((rows, self.table_width), np.int32))

    def largest_step_temp_bytes(self, pool: jax.ShapeDtypeStruct) -> int:
        """Scratch memory (activations) of the largest buckets' programs (prefill and mixed), from
        XLA's own analysis of them compiled for a pool of this shape: the most a step needs beside
        weights and pool."""
        ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        segment = lambda b, s: Segment(ints(b, s), ints(b), ints(b), ints(b, self.table_width))
        largest = [(StepKind.PREFILL, *max(self.prefill_buckets(), key=lambda bs: bs[0] * bs[1]))]
        if self.mixed_buckets():
            largest.append((StepKind.MIXED, self.max_batch, max(self.mixed_buckets())))
        temp = 0
        for kind, batch, seq in largest:   # a prefill step selects no pages; a mixed step's decode rows do
            shapes = self.segment_shapes(kind, batch, seq)
            rows = shapes[0][0]
            selection = None if kind is StepKind.PREFILL else self.selection_inputs([], np.zeros((rows,), np.int32))
            compiled = self._forward.lower(self.state, pool, tuple(segment(b, s) for b, s in shapes), selection,
                                           self._last_sampled, ints(rows),
                                           ints(rows) if kind is StepKind.MIXED else None).compile()
            temp = max(temp, int(compiled.memory_analysis().temp_size_in_bytes))
        return temp

    def token_masks(self, seqs: list[Sequence], num_tokens: list[int]) -> list[np.ndarray | None] | None:
        """The allowed-token bitmask of each row that samples under a structured-output constraint."""
        if not any(seq.constraint is not None for seq in seqs):
            return None
        masks = np.full((len(seqs), mask_width(self.vocab_size)), -1, np.int32)
        for i, (seq, n) in enumerate(zip(seqs, num_tokens)):
            if seq.constraint is not None and seq.num_computed + n == seq.num_tokens:
                seq.constraint.fill_bitmask(masks, i)
        return [masks[i] if seq.constraint is not None else None for i, seq in enumerate(seqs)]

    @property
    def num_buckets(self) -> int:
        return len(self.decode_buckets()) + len(self.prefill_buckets()) + len(self.mixed_buckets())

    def warmup(self, pool: jax.Array, sampling_variants: list[SamplingParams] | None = None,
               progress: Callable[[int], object] | None = None) -> jax.Array:
        """Compile every bucket (and the given sampling variants at every batch size, each also under
        a structured-output mask); `progress(1)` after each bucket."""
        variants = sampling_variants or [SamplingParams(temperature=0.0),
                                         SamplingParams(temperature=0.8, top_p=0.95, top_k=50),
                                         SamplingParams(temperature=0.8)]
        allowed = np.full((mask_width(self.vocab_size),), -1, np.int32)   # every token: a mask's program
        shapes = ([(StepKind.DECODE, b, 1) for b in self.decode_buckets()]
                  + [(StepKind.PREFILL, b, s) for b, s in self.prefill_buckets()]
                  + [(StepKind.MIXED, self.max_batch, s) for s in self.mixed_buckets()])
        for kind, b, s in shapes:
            logits, pool = self._run_bucket(pool, kind, b, s)
            if kind is not StepKind.MIXED:   # a mixed step samples max_batch rows, as the largest decode step
                for v, mask in itertools.product(variants, (None, allowed)):
                    batch, flags = build_sampling_batch([v], [((), 0)], [0], [0], b, self.vocab_size,
                                                        token_masks=[mask])
                    out = sample(logits, batch, flags=flags)
                self._pad_sampled(out.token_ids)   # as a step keeps its samples
            if progress is not None:
                progress(1)
        jax.block_until_ready(pool)
        return pool
