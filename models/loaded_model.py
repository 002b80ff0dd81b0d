"""What every loader returns (`LoadedModel`) and the model dtype names they accept (`parse_dtype`).

Its own module so that `models.loader` (which dispatches to every format) and `models.checkpoint`
(one of those formats, which builds a LoadedModel itself) can both import it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from models.config import ModelConfig
from models.precision import PRESETS, PrecisionPreset, kv_page_layout, layout_kv_dtype
from models.tokenizer import Tokenizer
from pallas_kernels.kv_pages import KVPageLayout

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: object  # LlamaForCausalLM
    tokenizer: Tokenizer | None
    dtype: object
    precision: PrecisionPreset = PRESETS["bf16"]

    @property
    def kv_dtype(self) -> str:
        """The KV page format this model's pages use (but in its `precision.kv_skip_layers`)."""
        return layout_kv_dtype(self.precision, self.dtype)

    def kv_layout(self, tokens_per_page: int, key_bounds: bool = False) -> KVPageLayout:
        """This model's KV page with `tokens_per_page` tokens (its slab placement not yet known);
        `key_bounds`: with each page's key bounds, for query-aware page selection."""
        return kv_page_layout(self.precision, self.config, tokens_per_page, self.dtype, key_bounds=key_bounds)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids from the config and the tokenizer (HF configs and GGUF metadata may list different ones)."""
        ids = set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else ())
        return tuple(sorted(ids))


def parse_dtype(dtype) -> object:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype in (jnp.bfloat16, jnp.float32):
        return dtype
    raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
