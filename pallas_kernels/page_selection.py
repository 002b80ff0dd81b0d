"""Query-aware page selection for sparse decode (Quest, arXiv:2406.10774; TinyServe, arXiv:2509.12211):
which of a sequence's KV pages each kv head reads this step.

Every page stores, per layer and kv head, the channel-wise min and max of its keys
(`KVPageLayout.key_bounds`). For a query q, `sum_i max(q_i * min_i, q_i * max_i)` bounds q . k from
above for every key of the page, so pages with a low bound cannot weigh much in the softmax.
`page_scores_reference` computes it per query head and takes the max over a kv head's query group:
all heads of a group share the pages read, so a page one head needs must be read whatever the
others score it (a sum would let the group's indifferent heads outvote it).

Selection policies are plug-ins (`SelectionPolicy`: a name and a ranking of pages, or none for
dense), chosen per sequence at run time by their index in `POLICIES`:
  full         every page (dense);
  bbox         the first (sink) and last (current) pages, then the highest-scoring others;
  sink_window  the first page and the most recent ones (StreamingLLM-style baseline, no scores);
  bbox_span    bbox, but each page it ranks brings its two neighbours just after it: fewer distinct
               places read, each with its context (exact recall of a fact that straddles pages).
A new policy is one more `SelectionPolicy` there: `select_pages` evaluates every policy's ranking
and each row takes its own, so the policies share one compiled program.
A sequence is sparse only when its context exceeds its gate and its budget is smaller than its
pages. `select_pages` turns the choice into a page table per kv head whose selected pages come first,
in context order, so only the last is partial: attending the first `head_lens` tokens of that table
is attention over the chosen pages (`paged_attention` with a [B, Hkv, P] table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import KVPageLayout, read_key_bounds, read_kv_pages


@dataclass(frozen=True)
class SelectionPolicy:
    """A page selection policy: its name, and how it ranks a sequence's pages once the sink and last
    pages are kept, `rank(scores [B, Hkv, P], columns [1, 1, P]) -> float32 [B, Hkv, P]`, higher
    first (ties: earlier pages first); None reads every page."""
    name: str
    rank: Callable[[jax.Array, jax.Array], jax.Array] | None


def _by_score(scores, columns):
    return jnp.where(jnp.isnan(scores), jnp.inf, scores)     # a page without a bound is never dropped


def _by_recency(scores, columns):
    return jnp.broadcast_to(columns.astype(jnp.float32), scores.shape)


NEIGHBOR_MARGIN = 1e-3   # a neighbour ranks just below its page, above any page that scores less


def _by_score_with_neighbors(scores, columns):
    """A page ranks by its own score or just below its better neighbour's, whichever is higher, so
    each chosen page brings the pages on either side (a fact split across a page boundary is read
    whole)."""
    s = _by_score(scores, columns)
    pad = jnp.full(s.shape[:-1] + (1,), -jnp.inf, s.dtype)
    neighbors = jnp.maximum(jnp.concatenate([pad, s[..., :-1]], -1), jnp.concatenate([s[..., 1:], pad], -1))
    return jnp.maximum(s, neighbors - NEIGHBOR_MARGIN)


POLICIES = (SelectionPolicy("full", None), SelectionPolicy("bbox", _by_score),
            SelectionPolicy("sink_window", _by_recency), SelectionPolicy("bbox_span", _by_score_with_neighbors))
POLICY_IDS = {p.name: i for i, p in enumerate(POLICIES)}


def policy_id(name: str) -> int:
    if name not in POLICY_IDS:
        raise ValueError(f"unknown page selection policy {name!r}; choose from {list(POLICY_IDS)}")
    return POLICY_IDS[name]


DEFAULT_BUDGET_TOKENS = 1024


@dataclass(frozen=True)
class SparseSpec:
    """What a model (by default) or a request asks of page selection: a policy, a budget in tokens
    or as a fraction of the context (default DEFAULT_BUDGET_TOKENS), the context length past which
    decoding turns sparse (default twice the budget), and how the budget is shared out over the
    layers: `layer_weights`, one positive weight per layer (None: every layer alike). A sparse
    layer reads the budget times its weight over the mean weight of the sparse layers (at least 2
    pages), so the pages read over all layers stay about the budget's (layers whose bounds rank
    pages less sharply can read more at no cost in bytes)."""
    policy: str = "bbox"
    budget_tokens: int | None = None
    budget_fraction: float | None = None
    gate_tokens: int | None = None
    layer_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        policy_id(self.policy)
        w = self.layer_weights
        if w is not None:
            if (isinstance(w, (str, bytes)) or not isinstance(w, (list, tuple)) or not w
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                               for x in w)):
                raise ValueError(f"layer_weights must be a non-empty list of positive numbers, one per layer, "
                                 f"got {w!r}")
            object.__setattr__(self, "layer_weights", tuple(float(x) for x in w))
        if self.budget_tokens is not None and self.budget_fraction is not None:
            raise ValueError("give budget_tokens or budget_fraction, not both")
        for name, minimum, what in (("budget_tokens", 1, "a positive"), ("gate_tokens", 0, "a non-negative")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} must be {what} integer, got {value!r}")
        f = self.budget_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0):
            raise ValueError(f"budget_fraction must be a number in (0, 1], got {f!r}")

    def row(self, kv_len: int, tokens_per_page: int) -> tuple[int, int, int]:
        """(policy id, budget in pages (>= 2), gate in tokens) for a sequence of kv_len tokens: one row
        of `SelectionInputs`."""
        if self.budget_fraction is not None:
            budget = -(-int(self.budget_fraction * kv_len) // tokens_per_page)
        else:
            budget = (self.budget_tokens or DEFAULT_BUDGET_TOKENS) // tokens_per_page
        budget = max(2, budget)
        gate = self.gate_tokens if self.gate_tokens is not None else 2 * budget * tokens_per_page
        return POLICY_IDS[self.policy], budget, gate

    def layer_budgets(self, budget_pages: int, num_layers: int, dense_layers: int) -> np.ndarray:
        """`share_budget` by this spec's layer weights."""
        return share_budget(budget_pages, self.layer_weights, num_layers, dense_layers)

    def check_layers(self, num_layers: int) -> None:
        """ValueError unless the layer weights (if any) are one per layer of a num_layers model."""
        _check_layers(self.layer_weights, num_layers)


def _check_layers(layer_weights: tuple[float, ...] | None, num_layers: int) -> None:
    if layer_weights is not None and len(layer_weights) != num_layers:
        raise ValueError(f"layer_weights has {len(layer_weights)} entries; the model has {num_layers} layers")


def share_budget(budget_pages: int, layer_weights: tuple[float, ...] | None, num_layers: int,
                 dense_layers: int) -> np.ndarray:
    """int32 [num_layers]: each layer's share of a budget of `budget_pages` per layer by
    `layer_weights` (None: alike), >= 2 each; the first `dense_layers` attend every page and keep
    the plain budget, unused."""
    budgets = np.full((num_layers,), budget_pages, np.int32)
    if layer_weights is None or dense_layers >= num_layers:
        return budgets
    _check_layers(layer_weights, num_layers)
    w = np.asarray(layer_weights[dense_layers:], np.float64)
    budgets[dense_layers:] = np.maximum(2, np.rint(budget_pages * w / w.mean()))
    return budgets


def bound_scores(q, k_min, k_max):
    """q [..., G, D] and one kv head's bounds [..., P, D] -> float32 [..., P]: the max over the query
    group of each page's upper bound on q . k."""
    q = q.astype(jnp.float32)[..., :, None, :]                                    # [..., G, 1, D]
    upper = jnp.maximum(q * k_min[..., None, :, :], q * k_max[..., None, :, :]).sum(axis=-1)
    return upper.max(axis=-2)


def page_scores_reference(q: jax.Array, pool: jax.Array, layout: KVPageLayout, layer, page_table: jax.Array,
                          kv_lens: jax.Array) -> jax.Array:
    """q [B, 1, Hq, D] (RoPE applied), page_table int32[B, P], kv_lens int32[B] -> float32 [B, Hkv, P]
    upper-bound scores, -inf for columns past each sequence's pages."""
    batch, _, num_q_heads, head_dim = q.shape
    hkv = layout.num_kv_heads
    k_min, k_max = read_key_bounds(pool, layout, page_table, layer)              # [B, P, Hkv, D]
    qg = q.reshape(batch, hkv, 1, num_q_heads // hkv, head_dim)                   # [B, Hkv, 1, G, D]
    scores = bound_scores(qg, jnp.swapaxes(k_min, 1, 2)[:, :, None], jnp.swapaxes(k_max, 1, 2)[:, :, None])
    live = jnp.arange(page_table.shape[1])[None, :] < layout.pages_for(kv_lens)[:, None]
    return jnp.where(live[:, None, :], scores[:, :, 0], -jnp.inf)


class SelectionInputs(NamedTuple):
    """Per sequence, what `select_pages` is asked for (int32[B] each, traced into the step). A
    model's step carries every layer's budget, budget_pages [B, L], and gives each layer its own
    column."""
    policy: jax.Array         # POLICY_IDS
    budget_pages: jax.Array   # pages read when sparse (>= 2: the sink and last pages)
    gate_tokens: jax.Array    # sparse only past this many tokens of context

    def at_layer(self, layer) -> "SelectionInputs":
        """A model step's inputs (budget_pages [B, L]) for one layer (traced index)."""
        return self._replace(budget_pages=jax.lax.dynamic_index_in_dim(self.budget_pages, layer, axis=1,
                                                                       keepdims=False))


class PageSelection(NamedTuple):
    head_table: jax.Array   # int32[B, Hkv, P]: each kv head's selected pages first, in context order
    head_lens: jax.Array    # int32[B, Hkv]: live tokens of head_table (only its last page is partial)
    pages_read: jax.Array   # int32[B, Hkv]: pages selected
    chosen: jax.Array       # bool[B, Hkv, P]: which columns of the page table are selected


def select_pages(scores: jax.Array, page_table: jax.Array, kv_lens: jax.Array, inputs: SelectionInputs,
                 tokens_per_page: int, policies: tuple[SelectionPolicy, ...] = POLICIES) -> PageSelection:
    """Which pages each kv head reads: scores float32 [B, Hkv, P] (`page_scores_reference`'s),
    page_table int32[B, P], kv_lens int32[B] and the sequences' `SelectionInputs` (policy ids index
    `policies`). A dense sequence's head table is its page table and its head_lens its kv_len."""
    policy, budget_pages, gate_tokens = inputs
    batch, hkv, width = scores.shape
    t = tokens_per_page
    col = jnp.arange(width, dtype=jnp.int32)[None, None, :]
    num_pages = ((kv_lens + t - 1) // t)[:, None, None]                         # [B, 1, 1]
    last = num_pages - 1
    live = col < num_pages
    dense_policy = jnp.asarray([p.rank is None for p in policies])[policy]
    sparse = (~dense_policy & (kv_lens > gate_tokens) & (budget_pages < num_pages[:, 0, 0]))[:, None, None]
    keep = jnp.where(sparse, budget_pages[:, None, None], num_pages)
    # Priority of each page: the sink and last pages first, then the row's policy's ranking.
    priority = jnp.zeros(scores.shape, jnp.float32)
    for i, p in enumerate(policies):
        if p.rank is not None:
            priority = jnp.where((policy == i)[:, None, None], p.rank(scores, col), priority)
    priority = jnp.where((col == 0) | (col == last), jnp.inf, priority)
    priority = jnp.where(live, priority, -jnp.inf)
    order = jnp.argsort(-priority, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    chosen = live & (rank < keep)
    # Chosen pages first, in context order (so only the last one is partial), the rest after.
    columns = jnp.argsort(jnp.where(chosen, col, width + col), axis=-1)
    head_table = jnp.take_along_axis(jnp.broadcast_to(page_table[:, None, :], scores.shape), columns, axis=-1)
    pages_read = chosen.sum(axis=-1).astype(jnp.int32)
    last_len = kv_lens[:, None] - last[:, :, 0] * t
    head_lens = jnp.where(pages_read > 0, (pages_read - 1) * t + last_len, 0)
    return PageSelection(head_table.astype(jnp.int32), head_lens.astype(jnp.int32), pages_read, chosen)

def selection_recall(q: jax.Array, pool: jax.Array, layout: KVPageLayout, layer, page_table: jax.Array,
                     kv_lens: jax.Array, chosen: jax.Array):
    """How well a selection caught the pages dense attention weighs most (an offline probe: it reads
    every page): q [B, 1, Hq, D], chosen bool [B, Hkv, P] -> (hits, pages) int32 [B, Hkv], `pages` the
    pages chosen and `hits` how many of them are among that many pages of highest attention mass
    (softmax probability summed over the page's tokens, averaged over the kv head's query group)."""
    batch, _, num_q_heads, head_dim = q.shape
    hkv, t = layout.num_kv_heads, layout.tokens_per_page
    width = page_table.shape[1]
    k, _ = read_kv_pages(pool, layout, page_table, layer)                       # [B, P, T, Hkv, D]
    k = k.astype(jnp.float32).reshape(batch, width * t, hkv, head_dim)
    live = jnp.arange(width * t)[None, :] < kv_lens[:, None]                     # [B, L]
    k = jnp.where(live[:, :, None, None], k, 0.0)
    qg = q.reshape(batch, hkv, num_q_heads // hkv, head_dim).astype(jnp.float32) * head_dim ** -0.5
    s = jnp.einsum("bhgd,blhd->bhgl", qg, k)
    p = jax.nn.softmax(jnp.where(live[:, None, None, :], s, -jnp.inf), axis=-1)
    mass = p.mean(axis=2).reshape(batch, hkv, width, t).sum(axis=-1)             # [B, Hkv, P]
    pages = chosen.sum(axis=-1)
    rank = jnp.argsort(jnp.argsort(-mass, axis=-1, stable=True), axis=-1)
    hits = (chosen & (rank < pages[..., None])).sum(axis=-1)
    return hits.astype(jnp.int32), pages.astype(jnp.int32)
