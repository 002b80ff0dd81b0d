"""What the global scheduler places: devices, the models' demands (architecture, precision, rate, SLO)
and the planner's settings, with FineServe's planning constants (arXiv 2509.06261)."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.precision import layer_kv_dtypes, resolve_precision
from pallas_kernels.kv_pages import KVPageLayout
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES

STRATEGIES = ("fineserve", "prism", "muxserve", "static")
TP_SIZES = (1, 2, 4, 8)
TP_RULES = ("min_rate_bs", "min_devices", "smallest_tp")
MAX_NUM_SEQS = 256                  # FineServe caps max_num_seqs at 256
PLAN_PROMPT_TOKENS = 722            # FineServe's planning lengths: 0.8 x the LMSYS p95 (903, 631)
PLAN_OUTPUT_TOKENS = 505
DEFAULT_TOKENS_PER_PAGE = 16
DEFAULT_MEMORY_FRACTION = 0.9


class PlacementError(RuntimeError):
    """A model cannot be placed at all (no TP/replica choice meets its SLO and rate within memory,
    or no device set has room); the message says why for each option tried."""


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    memory_bytes: int
    node: int = 0


@dataclass(frozen=True)
class ModelDemand:
    """One served model (a model in one precision) and its traffic."""

    name: str                     # unique served name, e.g. "llama3-8b/w4a8kv4"
    config: ModelConfig           # the architecture (dimensions: weights, KV, FLOPs)
    precision: str                # preset name: cost-profile key and weight format
    kv_dtype: str                 # "bf16" | "fp8" | "int8" | "int4" | "int4_fp8"
    weight_bytes: int             # all weights, unsharded
    kv_bytes_per_token: int       # all layers, K and V, scales included, unsharded
    rate: float                   # requests / s
    slo_ttft_s: float
    mean_prompt: int = PLAN_PROMPT_TOKENS
    mean_output: int = PLAN_OUTPUT_TOKENS
    tokens_per_page: int = DEFAULT_TOKENS_PER_PAGE
    profile_model: str | None = None  # model key in the DeviceProfile; default: name
    kv_skip_layers: tuple[int, ...] = ()  # layers whose KV stays bf16 whatever kv_dtype is
    tp_sizes: tuple[int, ...] | None = None  # the TP sizes it may run at; None: the scheduler's
    replicated_bytes: int = 0     # weights every TP member holds whole (0: all of them split)

    def __post_init__(self):
        if self.rate < 0 or self.slo_ttft_s <= 0:
            raise ValueError(f"{self.name}: need rate >= 0 and slo_ttft_s > 0, got {self.rate}, {self.slo_ttft_s}")
        if self.weight_bytes <= 0 or self.mean_prompt <= 0 or self.mean_output < 0:
            raise ValueError(f"{self.name}: weight_bytes and mean_prompt must be positive")
        if not 0 <= self.replicated_bytes <= self.weight_bytes:
            raise ValueError(f"{self.name}: replicated_bytes must be in [0, weight_bytes], got {self.replicated_bytes}")

    @classmethod
    def from_config(cls, name: str, config: ModelConfig, precision: str, rate: float, slo_ttft_s: float, *,
                    kv_dtype: str | None = None, mean_prompt: int = PLAN_PROMPT_TOKENS,
                    mean_output: int = PLAN_OUTPUT_TOKENS, tokens_per_page: int = DEFAULT_TOKENS_PER_PAGE,
                    profile_model: str | None = None, kv_skip_layers=None) -> "ModelDemand":
        """Weight and KV bytes from the repo's precision presets (exact packed sizes)."""
        preset = resolve_precision(precision, kv_dtype, kv_skip_layers=kv_skip_layers)
        return cls(name, config, precision, preset.kv_format, preset.weight_bytes(config),
                   preset.kv_bytes_per_token(config), rate, slo_ttft_s, mean_prompt, mean_output,
                   tokens_per_page, profile_model, preset.kv_skip_layers)

    @property
    def profile_key(self) -> str:
        return self.profile_model or self.name

    @property
    def seq_len(self) -> int:
        return self.mean_prompt + self.mean_output

    def kv_heads_per_device(self, tp: int) -> int:
        return max(1, -(-self.config.num_kv_heads // tp))  # replicated when tp > KV heads

    def weight_bytes_per_device(self, tp: int) -> int:
        return self.replicated_bytes + -(-(self.weight_bytes - self.replicated_bytes) // tp)

    def page_layout(self, tp: int = 1, kv_dtype: str | None = None) -> KVPageLayout:
        """The model's KV page on one device of a TP group (its KV heads split across the group)."""
        return KVPageLayout(self.config.num_layers, self.kv_heads_per_device(tp), self.config.head_dim,
                            self.tokens_per_page, kv_dtype or self.kv_dtype,
                            layer_kv_dtypes=layer_kv_dtypes(self.kv_skip_layers))


@dataclass(frozen=True)
class SchedulerConfig:
    memory_fraction: float = DEFAULT_MEMORY_FRACTION  # of device memory for weights + KV
    tp_sizes: tuple[int, ...] = TP_SIZES
    tp_rule: str = "min_rate_bs"      # fineserve's TP choice; see _PLAN_ORDER
    max_num_seqs: int = MAX_NUM_SEQS
    target_slab_bytes: int = DEFAULT_SLAB_BYTES
    use_spare_devices: bool = True    # static: devices left empty become extra replicas

    def __post_init__(self):
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.tp_rule not in TP_RULES:
            raise ValueError(f"unknown tp_rule {self.tp_rule!r}; choose one of {TP_RULES}")

    def usable_bytes(self, device: Device) -> int:
        return int(self.memory_fraction * device.memory_bytes)
