"""The two TOML files, as pydantic models: a fleet file (`Fleet.from_config`) and a serve config
(`ServeConfig.from_toml`), which is a fleet file plus [server], [[devices]] and each model's serving
keys (slo_ttft_ms, rate, max_queue); examples of both in README.md. `read_toml` reads a file,
`fleet_file` / `serve_file` validate its data.

Unknown keys are refused; byte sizes are integers or strings such as "256MiB" (`ByteSize`); types are
strict (true is not a count, "80" is not a port; an integer is a number). Each problem is one line of
one ValueError naming the file and the key, e.g.
    fleet.toml: [[models]] entry 1 ('small'): max_num_seqs must be an integer, got 2.5
A [[models]] entry takes every field of `ModelSpec` (passed in: fleet.py imports this module), so the
two cannot drift; ModelSpec checks the values. [server] and [[devices]] are `ServerConfig` and
`DeviceConfig`, which serve_config.py uses as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool,
                      StrictFloat, StrictInt, StrictStr, ValidationError, ValidationInfo, create_model,
                      model_validator)
from pydantic.dataclasses import dataclass

from serving.kv.pool_plan import POOL_MODES
from serving.scheduling.cost_model import StepCost
from serving.scheduling.local_scheduling import LocalScheduling
from serving.scheduling.slo import SLO
from serving.scheduling.step_policy import STEP_POLICIES

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_DRAIN_TIMEOUT_S = "127.0.0.1", 8000, 30.0
ADMISSIONS = ("saab", "fcfs")       # [server] admission; drop_hopeless picks SAAB's variant
DEFAULT_RATE = 1.0                  # requests / s


# --------------------------------------------------------------------------------------------------
# Values

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value, what: str) -> int:
    """An integer byte count, or a string such as "256MiB" / "1.5GB"."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{what} must be a byte count such as 268435456 or \"256MiB\", got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _bytes(value, info: ValidationInfo) -> int:
    return parse_bytes(value, info.field_name)


def _check(test, message: str) -> AfterValidator:
    """A value check: ValueError(message) unless test(value); message may name {key} and {value}."""
    def check(value, info: ValidationInfo):
        if not test(value):
            raise ValueError(message.format(key=info.field_name, value=value))
        return value
    return AfterValidator(check)


def _one_of(choices: tuple[str, ...]) -> AfterValidator:
    return _check(lambda v: v in choices, f"{{key}} must be one of {choices}, got {{value!r}}")


ByteSize = Annotated[int, BeforeValidator(_bytes)]
Positive = _check(lambda v: v > 0 and math.isfinite(v), "{key} must be positive, got {value!r}")
NonNegative = _check(lambda v: v >= 0, "{key} must be >= 0, got {value!r}")
NonEmpty = _check(bool, "{key} must be a non-empty string")
Port = _check(lambda p: 0 <= p <= 65535, "{key} must be in 0..65535, got {value}")
Rate = _check(lambda r: r >= 0 and math.isfinite(r), "{key} must be a finite number >= 0 (requests / s), got {value}")
PoolMode = Annotated[StrictStr, _check(lambda v: v in POOL_MODES,
                                       f"unknown pool_mode {{value!r}}; choose one of {POOL_MODES}")]
_FILE_TYPES = {str: StrictStr, int: StrictInt, float: StrictFloat, bool: StrictBool,  # what TOML gives
               tuple[int, ...]: list[StrictInt],
               # an inline table (sparse; its layer_weights a list)
               dict: dict[StrictStr, StrictStr | StrictInt | StrictFloat | list[StrictInt | StrictFloat]]}


# --------------------------------------------------------------------------------------------------
# Sections

_TABLE = ConfigDict(extra="forbid")


@dataclass(config=_TABLE)
class ServerConfig:
    """[server]: where `fineserve serve` listens and how each device schedules its models."""

    host: Annotated[StrictStr, NonEmpty] = DEFAULT_HOST
    port: Annotated[StrictInt, Port] = DEFAULT_PORT
    drain_timeout_s: Annotated[StrictFloat, NonNegative] = DEFAULT_DRAIN_TIMEOUT_S
    # FCFS within a model, as vLLM, and never a drop; latency-aware EDF between models, which takes
    # turns until a deadline is at risk (why this default: docs/scheduling.md).
    admission: Annotated[StrictStr, _one_of(ADMISSIONS)] = "fcfs"
    drop_hopeless: StrictBool = False
    step_policy: Annotated[StrictStr, _one_of(STEP_POLICIES)] = "edf"
    # serve over this Ray cluster ("auto": the one this machine belongs to, or "HOST:PORT"); as --ray
    ray_address: Annotated[StrictStr, NonEmpty] | None = None

    def scheduling(self, slo_ttft_s: dict[str, float], step_costs: dict[str, StepCost | None]) -> LocalScheduling:
        """One device's local scheduling under this [server] section, for its models' TTFT SLOs
        (seconds) and step costs (SAAB needs them; a model without one admits FCFS)."""
        admission = self.admission if self.admission == "fcfs" else "saab" if self.drop_hopeless else "saab-keep"
        return LocalScheduling(admission, self.step_policy, {n: SLO(s) for n, s in slo_ttft_s.items()}, step_costs)


@dataclass(config=_TABLE)
class DeviceConfig:
    """One device of the pool ([[devices]]). None fields come from the jax device when they are needed;
    name and jax_device from the entry's position (ServeConfig fills them in)."""

    name: Annotated[StrictStr, NonEmpty] | None = None              # None: "device<i>"
    jax_device: Annotated[StrictInt, NonNegative] | None = None     # index into jax.devices(); None: <i>
    memory_bytes: Annotated[ByteSize, Positive] | None = None
    kind: Annotated[StrictStr, NonEmpty] | None = None
    pool_bytes: Annotated[ByteSize, Positive] | None = None         # None: ServeConfig.pool_bytes


class ModelEntry(BaseModel):
    """A fleet file's [[models]] entry: the fields of a ModelSpec (`_entry` adds them), which checks
    them too (its errors name the entry)."""

    model_config = _TABLE
    spec_type: ClassVar[type]
    _spec: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _make_spec(self):
        self._spec = self.spec_type(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.spec_type)})
        return self

    @property
    def spec(self):
        """The entry's ModelSpec."""
        return self._spec


class ServedModelEntry(ModelEntry):
    """A serve config's [[models]] entry: a fleet file's, plus what the server plans and admits by."""

    slo_ttft_ms: Annotated[StrictFloat, Positive] | None = None     # None: serve_config.slo_ttft_s decides
    rate: Annotated[StrictFloat, Rate] = DEFAULT_RATE               # expected requests / s (placement only)
    max_queue: Annotated[StrictInt, _check(lambda q: q >= 1, "{key} must be >= 1, got {value}")] | None = None

    @property
    def slo_ttft_s(self) -> float | None:
        return None if self.slo_ttft_ms is None else self.slo_ttft_ms / 1e3


@functools.cache
def _entry(base: type[ModelEntry], spec: type) -> type[ModelEntry]:
    """`base` with a field for each field of the dataclass `spec` (ModelSpec): those of its types that
    a file can hold (the model: a name or a path, not a loaded one), a size for *_bytes fields."""
    hints, fields = typing.get_type_hints(spec), {}
    for f in dataclasses.fields(spec):
        types = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = ByteSize if f.name.endswith("_bytes") else functools.reduce(
            operator.or_, [_FILE_TYPES[t] for t in types if t in _FILE_TYPES])
        fields[f.name] = (kind | None if type(None) in types else kind,
                          ... if f.default is dataclasses.MISSING else f.default)
    entry = create_model(base.__name__, __base__=base, **fields)
    entry.spec_type = spec
    return entry


def _at_least_one(entries: list, info: ValidationInfo) -> list:
    if not entries:
        raise ValueError(f"needs at least one [[{info.field_name}]] entry")
    return entries


Entry = TypeVar("Entry", bound=ModelEntry)


class FleetFile(BaseModel, Generic[Entry]):
    """A fleet file: models sharing one KV pool."""

    model_config = _TABLE
    what: ClassVar[str] = "fleet config"
    models: Annotated[list[Entry], AfterValidator(_at_least_one)] = Field([], validate_default=True)
    pool_bytes: ByteSize | None = None         # None: the default of Fleet / ServeConfig
    pool_mode: PoolMode | None = None
    slab_bytes: ByteSize | None = None
    # instead of pool_bytes: the pool takes this fraction of the device's memory (serving.kv.pool_sizing)
    gpu_memory_utilization: Annotated[StrictFloat, _check(lambda u: 0 < u <= 1,
                                                          "{key} must be in (0, 1], got {value}")] | None = None

    def pool(self) -> dict:
        """The pool keys the file sets, as keyword arguments of Fleet / ServeConfig."""
        return self.model_dump(include={"pool_bytes", "pool_mode", "slab_bytes", "gpu_memory_utilization"},
                               exclude_none=True)


class ServeFile(FleetFile[Entry], Generic[Entry]):
    """A serve config: a fleet file, plus [server] and [[devices]]."""

    what: ClassVar[str] = "serve config"
    server: ServerConfig = Field(default_factory=ServerConfig)
    devices: list[DeviceConfig] = []


# --------------------------------------------------------------------------------------------------
# Reading and checking a file


def read_toml(path: str | Path, what: str) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def fleet_file(data: dict, spec: type, source: str | Path | None = None) -> FleetFile:
    """A fleet file's data, checked; `spec`: ModelSpec; `source`: the file (for errors)."""
    return _validate(FleetFile[_entry(ModelEntry, spec)], data, source)


def serve_file(data: dict, spec: type, source: str | Path | None = None) -> ServeFile:
    """A serve config's data, checked; `spec`: ModelSpec; `source`: the file (for errors)."""
    return _validate(ServeFile[_entry(ServedModelEntry, spec)], data, source)


def _validate(schema: type[FleetFile], data: dict, source: str | Path | None):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        source = source or schema.what
        what = "" if source == schema.what else schema.what + " "
        raise ValueError("\n".join(f"{source}: {p}" for p in _problems(e, schema, data, what))) from None


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "list_type": "an array of tables", "model_type": "a table",
               "dataclass_type": "a table"}


def _problems(error: ValidationError, schema: type[BaseModel], data: dict, what: str) -> list[str]:
    """One line per problem, each naming where it is as the file writes it ("[server] port",
    "[[models]] entry 1 ('x'): rate"); one line for all the unknown keys of a table (at the top
    level: "unknown <what>keys")."""
    lines, unknown = {}, {}  # lines: by error index, or by table for its unknown keys
    for i, e in enumerate(error.errors()):
        loc, kind = e["loc"], e["type"]
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            keys = unknown.setdefault(loc[:-1], [])
            keys.append(loc[-1])
            table = _table(loc[:-1], data)
            unknown_keys = f"{table}: unknown keys" if table else f"unknown {what}keys"
            lines[loc[:-1]] = f"{unknown_keys} {sorted(keys)}; known: {_known(schema, loc[:-1])}"
        elif kind in ("missing", "missing_argument"):
            table = _table(loc[:-1], data)
            lines[i] = (f"{table}: " if table else "") + f"needs a {loc[-1]!r}"
        elif kind == "value_error":  # our checks: a sentence that names the key
            where = loc[:-1] if loc and isinstance(loc[-1], str) else loc
            table = _table(where, data)
            lines[i] = (f"{table}: " if table else "") + str(e["ctx"]["error"])
        elif kind in _TYPE_NAMES:
            expected = "an array" if kind == "list_type" and len(loc) > 1 else _TYPE_NAMES[kind]  # a key's value
            lines[i] = f"{_key(loc, data, kind)} must be {expected}, got {e['input']!r}"
        else:
            lines[i] = f"{_key(loc, data, kind)}: {e['msg']}"
    return list(lines.values())


def _table(loc: tuple, data) -> str | None:
    """A table as the file writes it: None (the top level), "[server]", "[[models]] entry 1 ('x')"."""
    if not loc:
        return None
    if not isinstance(loc[-1], int):
        return f"[{loc[-1]}]"
    name = _get(data, loc + ("name",))
    return f"[[{loc[-2]}]] entry {loc[-1]}" + (f" ({name!r})" if isinstance(name, str) else "")


def _key(loc: tuple, data, kind: str) -> str:
    """A key as the file writes it: "pool_bytes", "[server] port", "[[models]] entry 1 ('x'): rate";
    a table itself where one was expected ("[server] must be a table"); an item of a key's array
    ("[[models]] entry 0: kv_skip_layers item 1")."""
    if len(loc) >= 3 and isinstance(loc[-1], int):
        return f"{_key(loc[:-1], data, kind)} item {loc[-1]}"
    if kind in ("model_type", "dataclass_type") or not loc or isinstance(loc[-1], int):
        return _table(loc, data) or "the file"
    table = _table(loc[:-1], data)
    return loc[-1] if table is None else f"{table}{': ' if isinstance(loc[-2], int) else ' '}{loc[-1]}"


def _get(data, loc: tuple):
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _known(schema, loc: tuple) -> list[str]:
    """The keys the table at `loc` takes."""
    for part in loc:
        if isinstance(part, str):
            schema = schema.__pydantic_fields__[part].annotation  # a table's type, or list[its type]
            schema = typing.get_args(schema)[0] if typing.get_origin(schema) is list else schema
    return sorted(schema.__pydantic_fields__)
