"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2): GQA, RMSNorm, SwiGLU.

The model reads and writes its KV cache only through page tables into the shared pool: every forward
call takes one or more `Segment`s of token rows `[B, S]` (S = 1 for decode, a chunk for prefill),
row b starting at `start_pos[b]`, writes their K/V into the sequence's pages and attends over all
cached tokens. Several segments (a mixed step: decode rows `[B, 1]` beside a prompt chunk `[1, S]`)
share every matmul as one token axis; only attention runs per segment, each with its own kernel.

Layers are stacked (one `DecoderLayer` whose parameters carry a leading layer axis) and run under
`lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.quant_linear import QuantLinear
from models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.kv_write import write_bounds, write_kv
from pallas_kernels.page_selection import SelectionInputs, selection_recall
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.sparse_attention import sparse_decode_attention


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        # As HF: normalise in float32, cast back, then scale.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def _linear(din, dout, bias, dtype, rngs):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _apply(linear, x, kernels: str):
    """A linear layer, float (nnx.Linear) or quantized (QuantLinear, which runs `kernels`' matmul)."""
    return linear(x, kernels) if isinstance(linear, QuantLinear) else linear(x)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.q_proj = _linear(h, cfg.num_heads * d, cfg.attention_bias, dtype, rngs)
        self.k_proj = _linear(h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, rngs)
        self.v_proj = _linear(h, cfg.num_kv_heads * d, cfg.attention_bias, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * d, h, False, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.gate_proj = _linear(h, cfg.intermediate_size, False, dtype, rngs)
        self.up_proj = _linear(h, cfg.intermediate_size, False, dtype, rngs)
        self.down_proj = _linear(cfg.intermediate_size, h, False, dtype, rngs)
        self.head_dim = d
        self.k_rope_scale = nnx.data(None)  # post-RoPE key scaling, [Hkv * D]: see LlamaForCausalLM.scale_rotated_keys

    def __call__(self, x, cos, sin, attend, cache, observe=None, kernels: str = "xla", reduce=None):
        """One decoder layer. `attend(q, k, v, cache) -> (out [B, S, Hq, D], cache)` is paged attention
        over the pool in serving and dense causal attention in calibration; `observe(site, x)` sees
        the input of every linear group (calibration statistics), with sites "attn_in", "o_in",
        "mlp_in" and "down_in", and the post-RoPE keys ("k", for SmoothAttention). `kernels`: the
        implementation quantized linears run ("xla", "pallas", "interpret"). `reduce(y)` sums the
        row-parallel outputs (o_proj, down_proj) over a tensor-parallel group (`lax.psum`). Head
        counts come from the activations' shapes, so a tensor-parallel shard (the columns of its own
        heads) runs this same code."""
        observe = observe or (lambda site, value: None)
        reduce = reduce or (lambda y: y)
        b, s, _ = x.shape
        d = self.head_dim
        h = self.input_layernorm(x)
        observe("attn_in", h)
        q = apply_rope(_apply(self.q_proj, h, kernels).reshape(b, s, -1, d), cos, sin)
        k = apply_rope(_apply(self.k_proj, h, kernels).reshape(b, s, -1, d), cos, sin)
        if self.k_rope_scale is not None:   # K * f, Q / f: the scores are unchanged, K's range is not
            f = self.k_rope_scale[...].reshape(-1, d)
            k = (k * f).astype(k.dtype)
            q = (q / jnp.repeat(f, q.shape[2] // k.shape[2], axis=0)).astype(q.dtype)
        v = _apply(self.v_proj, h, kernels).reshape(b, s, -1, d)
        observe("k", k.reshape(b, s, -1))
        attn, cache = attend(q, k, v, cache)
        attn = attn.reshape(b, s, -1)
        observe("o_in", attn)
        x = x + reduce(_apply(self.o_proj, attn, kernels))
        h = self.post_attention_layernorm(x)
        observe("mlp_in", h)
        act = jax.nn.silu(_apply(self.gate_proj, h, kernels)) * _apply(self.up_proj, h, kernels)
        observe("down_in", act)
        x = x + reduce(_apply(self.down_proj, act, kernels))
        return x, cache


def dense_causal_attention(q, k, v):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]: plain causal GQA attention in float32
    (calibration runs whole windows at once, without the pool)."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    qg = q.reshape(b, s, k.shape[2], group, d).astype(jnp.float32) * d ** -0.5
    scores = jnp.einsum("bshgd,bthd->bhgst", qg, k.astype(jnp.float32))
    causal = jnp.tril(jnp.ones((s, s), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgst,bthd->bshgd", probs, v.astype(jnp.float32))
    return out.reshape(b, s, hq, d).astype(q.dtype)


class AttentionStats(NamedTuple):
    """What a forward's attention read, per sequence (int32[B] each), summed over layers and kv heads."""
    pages_read: jax.Array     # KV pages attended
    recall_hits: jax.Array    # with measure_recall: selected pages among the top pages by attention mass
    recall_pages: jax.Array   # ... out of this many selected pages (0: not measured)

    @classmethod
    def zeros(cls, batch: int) -> AttentionStats:
        return cls(*(jnp.zeros((batch,), jnp.int32) for _ in range(3)))


class Segment(NamedTuple):
    """Rows of one padded shape in a step: tokens int32[B, S]; row b computes its first num_new[b]
    tokens at positions start_pos[b] onwards, into the pages of page_table[b] (int32[B, P])."""
    tokens: jax.Array
    start_pos: jax.Array
    num_new: jax.Array
    page_table: jax.Array


class _SegmentPages:
    """Where one segment's tokens live in the pool (see PagedKV)."""

    def __init__(self, seg: Segment, t: int):
        b, s = seg.tokens.shape
        self.shape, self.page_table = (b, s), seg.page_table
        offsets = jnp.arange(s, dtype=jnp.int32)
        self.positions = seg.start_pos[:, None] + offsets[None, :]                  # [B, S]
        self.write_valid = offsets[None, :] < seg.num_new[:, None]                   # [B, S]
        page_idx = jnp.where(self.write_valid, self.positions // t, 0)
        self.write_pages = jnp.take_along_axis(seg.page_table, page_idx, axis=1)    # [B, S]
        self.write_slots = self.positions % t
        self.kv_lens = seg.start_pos + seg.num_new
        # The pages this step writes into ([B, P'], P' the most S tokens can span) and how many of
        # their tokens are written after it: their key bounds are recomputed.
        span = (s + t - 2) // t + 1
        idx = seg.start_pos[:, None] // t + jnp.arange(span, dtype=jnp.int32)[None, :]
        touched = (idx * t < self.kv_lens[:, None]) & (seg.num_new[:, None] > 0)
        self.bound_pages = jnp.take_along_axis(seg.page_table, jnp.where(touched, idx, 0), axis=1).reshape(-1)
        self.bound_fill = jnp.where(touched, jnp.clip(self.kv_lens[:, None] - idx * t, 0, t), 0).reshape(-1)


class PagedKV:
    """Where this step's tokens live in the pool: derived once per forward, shared by all layers.
    One segment keeps its [B, S] layout; several are laid out as one row [1, sum(B * S)], in order,
    and attention splits them again. With `selection` (decode steps of a model whose pages keep key
    bounds), the one-token segment's layers from `dense_layers` on attend only the pages each
    sequence's policy selects, under its budget for the layer (`selection.budget_pages` [B, L]);
    `measure_recall` also scores each selection against dense attention (`selection_recall`: reads
    every page, so for evaluation, not serving)."""

    def __init__(self, layout: KVPageLayout, segments: tuple[Segment, ...], kernels: str,
                 selection: SelectionInputs | None = None, dense_layers: int = 0, measure_recall: bool = False):
        self.layout, self.kernels = layout, kernels
        self.segments = [_SegmentPages(seg, layout.tokens_per_page) for seg in segments]
        if sum(p.shape[1] == 1 for p in self.segments) > 1:
            raise ValueError("a step has at most one segment of one-token (decode) rows")
        self.selection = selection
        self.dense_layers, self.measure_recall = dense_layers, measure_recall

        flat = lambda name: jnp.concatenate([getattr(p, name).reshape(-1) for p in self.segments])
        # [B, S], or [1, T] for several segments
        self.positions = self.segments[0].positions if len(self.segments) == 1 else flat("positions")[None]
        self.write_pages, self.write_slots, self.write_valid, self.bound_pages, self.bound_fill = (
            flat(name) for name in ("write_pages", "write_slots", "write_valid", "bound_pages", "bound_fill"))

    def attend(self, q, k, v, cache, layer):
        """Write this step's K/V (quantized on write for quantized layouts) and attend over the pages.
        `cache` is (pool, AttentionStats so far); this layer's are added. A page mixing KV formats
        over layers picks the layer's group at run time (`lax.switch`: the layers stay one scan; each
        group's attention is its own branch)."""
        pool, stats = cache
        dense = layer < self.dense_layers
        selection = None if self.selection is None else self.selection.at_layer(layer)
        groups = self.layout.layer_groups()
        if len(groups) == 1:
            out, pool, step = self._attend_group(q, k, v, pool, dense, selection, layer, groups[0].layout)
        else:
            group_of_layer = np.repeat(np.arange(len(groups), dtype=np.int32),
                                       [g.layout.num_layers for g in groups])
            branches = [functools.partial(self._attend_group, layer=layer - g.first_layer, layout=g.layout)
                        for g in groups]
            out, pool, step = jax.lax.switch(jnp.asarray(group_of_layer)[layer], branches, q, k, v, pool, dense,
                                             selection)
        return out, (pool, AttentionStats(*(a + b for a, b in zip(stats, step))))

    def _attend_group(self, q, k, v, pool, dense, selection, layer, layout: KVPageLayout):
        hkv, d = k.shape[2:]
        n = k.shape[0] * k.shape[1]
        pool = write_kv(pool, layout, self.write_pages, self.write_slots, self.write_valid, layer,
                        k.reshape(n, hkv, d), v.reshape(n, hkv, d), kernels=self.kernels)
        if layout.key_bounds:
            pool = write_bounds(pool, layout, self.bound_pages, self.bound_fill, layer, kernels=self.kernels)
        if len(self.segments) == 1:
            out, stats = self._attend_segment(q, pool, dense, selection, layer, layout, self.segments[0])
            return out, pool, stats
        outs, stats, start = [], [], 0
        for seg in self.segments:
            b, s = seg.shape
            out, st = self._attend_segment(q[:, start:start + b * s].reshape(b, s, *q.shape[2:]), pool, dense,
                                           selection, layer, layout, seg)
            outs.append(out.reshape(1, b * s, *q.shape[2:]))
            stats.append(st)
            start += b * s
        return (jnp.concatenate(outs, axis=1), pool,
                AttentionStats(*(jnp.concatenate(parts) for parts in zip(*stats))))

    def _attend_segment(self, q, pool, dense, selection, layer, layout: KVPageLayout, seg: _SegmentPages):
        b, hkv = seg.shape[0], layout.num_kv_heads

        def attend_dense():
            out = paged_attention(q, pool, layout, layer, seg.page_table, seg.positions, seg.kv_lens,
                                  kernels=self.kernels)
            return out, AttentionStats.zeros(b)._replace(pages_read=layout.pages_for(seg.kv_lens) * hkv)

        if selection is None or not layout.key_bounds or seg.shape[1] != 1:
            return attend_dense()

        def attend_sparse():
            out, chosen = sparse_decode_attention(q, pool, layout, layer, seg.page_table, seg.positions,
                                                  seg.kv_lens, selection, kernels=self.kernels)
            stats = AttentionStats.zeros(b)._replace(pages_read=chosen.pages_read.sum(axis=1))
            if self.measure_recall:
                hits, pages = selection_recall(q, pool, layout, layer, seg.page_table, seg.kv_lens, chosen.chosen)
                stats = stats._replace(recall_hits=hits.sum(axis=1), recall_pages=pages.sum(axis=1))
            return out, stats

        return jax.lax.cond(dense, attend_dense, attend_sparse)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return DecoderLayer(cfg, dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)

    def scale_rotated_keys(self, factors=None) -> None:
        """Scale every layer's keys after RoPE by `factors` [L, Hkv * D] (ones when None) and its
        queries by the inverse (FireQ's post-RoPE scaling: per channel, so it cannot be folded into
        W_k, which RoPE follows). What the KV cache stores changes, the attention output does not."""
        cfg = self.config
        shape = (cfg.num_layers, cfg.num_kv_heads * cfg.head_dim)
        factors = jnp.ones(shape, self.dtype) if factors is None else jnp.asarray(factors, self.dtype)
        if factors.shape != shape:
            raise ValueError(f"key scale factors must be {shape}, got {factors.shape}")
        self.layers.k_rope_scale = nnx.Param(factors)

    def __call__(self, segments: Segment | tuple[Segment, ...], pool, layout: KVPageLayout,
                 kernels: str = "xla", selection: SelectionInputs | None = None, dense_layers: int = 0,
                 measure_recall: bool = False, tp_axis: str | None = None):
        """segments: the step's token rows (`Segment`; several for a mixed step, at most one of them
        of one-token rows). `kernels`: the implementation of attention, KV writes and quantized
        matmuls ("xla", "pallas", "interpret"). `selection`: per row of the one-token segment, page
        selection (the layout must keep key bounds; budget_pages [B, L], each layer's own), dense in
        layers below `dense_layers`;
        `measure_recall`: score the selections against dense attention (evaluation only).
        `tp_axis`: inside `shard_map` over a tensor-parallel group, the mesh axis the row-parallel
        outputs are summed over (this shard's state holds its own heads' columns and `layout` its
        own kv heads). Returns the final hidden states ([B, S, hidden] for one segment; [1, T,
        hidden] for several, their rows flattened in order), the updated pool and what attention
        read (`AttentionStats` per row, segments in order, of this shard's kv heads)."""
        segments = (segments,) if isinstance(segments, Segment) else tuple(segments)
        kv = PagedKV(layout, segments, kernels, selection, dense_layers, measure_recall)
        tokens = segments[0].tokens if len(segments) == 1 else jnp.concatenate(
            [seg.tokens.reshape(1, -1) for seg in segments], axis=1)
        cos, sin = rope_cos_sin(kv.positions, jnp.asarray(inverse_frequencies(self.config)), self.dtype)
        x = self.embed_tokens(tokens)
        graphdef, layer_state = nnx.split(self.layers)
        reduce = None if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))

        def body(carry, xs):
            x, cache = carry
            state, layer = xs
            attend = lambda q, k, v, cache: kv.attend(q, k, v, cache, layer)
            x, cache = nnx.merge(graphdef, state)(x, cos, sin, attend, cache, kernels=kernels, reduce=reduce)
            return (x, cache), None

        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        stats = AttentionStats.zeros(sum(seg.tokens.shape[0] for seg in segments))
        (x, (pool, stats)), _ = jax.lax.scan(body, (x, (pool, stats)), (layer_state, layer_ids))
        return self.norm(x), pool, stats

    def forward_dense(self, tokens, observe_fn=None):
        """Calibration forward over whole windows without the pool: tokens int32[B, S] -> (final hidden
        [B, S, hidden], stats). `observe_fn(x) -> pytree` reduces each linear group's input; stats maps
        each site to that pytree stacked over layers."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_cos_sin(positions, jnp.asarray(inverse_frequencies(self.config)), self.dtype)
        graphdef, layer_state = nnx.split(self.layers)

        def body(x, state):
            stats = {}

            def observe(site, value):
                if observe_fn is not None:
                    stats[site] = observe_fn(value)

            attend = lambda q, k, v, cache: (dense_causal_attention(q, k, v), cache)
            x, _ = nnx.merge(graphdef, state)(x, cos, sin, attend, None, observe)
            return x, stats

        x, stats = jax.lax.scan(body, self.embed_tokens(tokens), layer_state)
        return self.norm(x), stats

    def logits(self, hidden):
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        if self.lm_head is None:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)
