"""Structured outputs: a request's JSON schema, JSON object, regex, choice or grammar, enforced
token by token.

llguidance (the grammar engine of vLLM's `guidance` backend and of SGLang's) compiles the
constraint against the model's tokenizer into a matcher; before each sampled token the matcher
writes the sequence's allowed-token bitmask (32 tokens per int32 word), which the jitted sampler
applies to the logits (`sampling.apply_token_mask`), and the sampled token is then fed back to
it. Chosen over xgrammar because it needs neither torch nor transformers: the bitmask is plain
numpy, built on the host beside the batch. Compiled constraints are cached per model
(`GrammarCache`): a new request copies a compiled matcher instead of compiling again, and the
sampler never recompiles for a new schema (the mask is an input, not a static argument).

JSON answers also get a cap on a number's digit runs (`MAX_NUMBER_DIGITS`): JSON bounds no number's
length, and a small model can loop on digits until `max_tokens` cuts the answer short; past the cap
only the tokens that end the run are allowed, so the number closes and the answer stays valid.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, fields

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.numpy import fill_next_token_bitmask

MAX_CACHED_GRAMMARS = 64
# JSON without free whitespace between tokens (vLLM's disable_any_whitespace): still valid JSON, and
# a small model cannot loop on whitespace until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
# The most digits in a row a JSON answer's number may have (its integer part, fraction and exponent
# each): int64 needs 19, a double round-trips in 17 significant digits; more only comes from a loop.
MAX_NUMBER_DIGITS = 20


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a request's output must match (vLLM's StructuredOutputsParams): exactly one of
    `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings) or `grammar` (Lark, llguidance's dialect; GBNF/EBNF is
    converted)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise ValueError(f"structured_outputs: choice must be a non-empty list of strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name, kind in (("json", (dict, str)), ("regex", str), ("grammar", str)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"structured_outputs: {name} has the wrong type: {type(value).__name__}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs: json_object must be a bool, got {self.json_object!r}")
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one of json, json_object, regex, choice or grammar; "
                             f"got {given or 'none'}")

    @classmethod
    def of(cls, value) -> StructuredOutputsParams | None:
        """From a StructuredOutputsParams or a dict of its fields; ValueError naming what is wrong."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object like {{'json': {{...}}}}, got {value!r}")
        if unknown := sorted(set(value) - {f.name for f in fields(cls)}):
            raise ValueError(f"structured_outputs: unknown field(s) {unknown}")
        return cls(**value)

    @property
    def is_json(self) -> bool:
        return self.json is not None or self.json_object

    @property
    def key(self) -> str:
        """A canonical text of the constraint (the compiled-grammar cache's key)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar."""
        if self.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.grammar))


def mask_width(vocab_size: int) -> int:
    """int32 words of one row's bitmask."""
    return (vocab_size + 31) // 32


class NumberDigits:
    """One model's tokens seen as digits: each token's bytes and how many digits it starts with,
    and the bitmask of the tokens allowed when a number has room for `room` more digits."""

    def __init__(self, lltokenizer: llguidance.LLTokenizer, vocab_size: int):
        self.token_bytes = [b"" if lltokenizer.is_special_token(t) else lltokenizer.decode_bytes([t])
                            for t in range(vocab_size)]
        self.leading = np.array([len(b) - len(b.lstrip(b"0123456789")) for b in self.token_bytes], np.int32)
        self.longest = int(self.leading.max(initial=0))
        self._masks: dict[int, np.ndarray] = {}

    def allowed(self, room: int) -> np.ndarray:
        """The int32 bitmask row of the tokens that add at most `room` digits to a run."""
        room = max(room, 0)
        if room not in self._masks:
            bits = np.ones(mask_width(len(self.leading)) * 32, bool)
            bits[:len(self.leading)] = self.leading <= room
            self._masks[room] = np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)
        return self._masks[room]


class OutputConstraint:
    """One sequence's constraint: its llguidance matcher, fed every output token, and for JSON the
    digit cap, which scans the answer's bytes for whether it is in a string and, outside one, how
    many digits in a row it ends with."""

    def __init__(self, matcher: llguidance.LLMatcher, digits: NumberDigits | None):
        self.matcher, self.digits = matcher, digits
        self.in_string = self.escaped = False
        self.digit_run = 0

    def fill_bitmask(self, masks: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `masks[row]`."""
        fill_next_token_bitmask(self.matcher, masks, row)
        near_cap = self.digits is not None and self.digit_run + self.digits.longest > MAX_NUMBER_DIGITS
        if near_cap and not self.in_string:
            capped = masks[row] & self.digits.allowed(MAX_NUMBER_DIGITS - self.digit_run)
            if capped.any():   # never leave the grammar without a way on
                masks[row] = capped

    def consume_token(self, token: int) -> bool:
        ok = self.matcher.consume_token(token)
        if self.digits is not None:
            for byte in self.digits.token_bytes[token]:
                if self.in_string:
                    self.in_string = self.escaped or byte != ord('"')
                    self.escaped = not self.escaped and byte == ord("\\")
                else:
                    self.in_string = byte == ord('"')
                    self.digit_run = self.digit_run + 1 if ord("0") <= byte <= ord("9") else 0
        return ok

    def is_stopped(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCache:
    """One model's grammar engine: its tokenizer as llguidance sees it (built on first use, about a
    second), and the compiled constraints of recent requests (LRU). `constraint` gives a request its
    own, with a copy of the compiled matcher."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, tuple(eos_token_ids)
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._digits: NumberDigits | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            self._lltokenizer = llguidance.LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                                       eos_token=list(self.eos_token_ids) or None)
        return self._lltokenizer

    @property
    def digits(self) -> NumberDigits:
        if self._digits is None:
            self._digits = NumberDigits(self.lltokenizer, self.vocab_size)
        return self._digits

    def constraint(self, params: StructuredOutputsParams) -> OutputConstraint:
        """A fresh constraint for `params`: a copy of the compiled matcher, and the digit cap for JSON."""
        return OutputConstraint(self.compiled(params).deep_copy(), self.digits if params.is_json else None)

    def compiled(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled matcher of `params` (not to be fed tokens); ValueError with llguidance's
        message when it does not compile."""
        key = params.key
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                grammar = params.grammar_text()
            except Exception as e:   # the grammar converters' own errors, on what the request sent
                raise ValueError(f"structured_outputs: {e}") from None
            compiled = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise ValueError(f"structured_outputs: the constraint does not compile: {compiled.get_error()}")
            self._compiled[key] = compiled
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return compiled

