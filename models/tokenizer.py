"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer`, built from a HF model directory or
from the vocabulary embedded in a GGUF file, plus HF-compatible chat templating and
incremental (streaming) detokenization."""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

from jinja2 import meta
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from models.errors import ModelConfigError, ModelLoadError

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer regexes for GGUF `tokenizer.ggml.pre` values (from llama.cpp's llama-vocab.cpp).
# GPT-2 regex, but every digit is its own pre-token.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "falcon")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _token_content(tok: Any) -> str | None:
    """`bos_token` in tokenizer_config.json is a string or an AddedToken dict ({"content": ...})."""
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def _split_chat_templates(value: Any) -> tuple[str | None, dict[str, str]]:
    """HF `chat_template` is a string, or a list of {"name", "template"}: (the "default" one, the
    others by name, e.g. "tool_use")."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        named = {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
        return named.pop("default", None), named
    return None, {}


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Same as transformers' chat-template `tojson` (jinja's escapes HTML, which HF's does not).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_JINJA_CACHE: dict[str, Any] = {}


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile_template(source: str):
    compiled = _JINJA_CACHE.get(source)
    if compiled is None:
        compiled = _template_env().from_string(source)
        _JINJA_CACHE[source] = compiled
    return compiled


def validate_messages(messages: Any) -> None:
    """Raise ValueError naming the problem unless `messages` is a non-empty list of
    {"role": str, "content": str, ...} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] needs a string 'content'")


class DecodeStream:
    """Incremental detokenizer: `step(token_id)` returns the newly completed text ("" while e.g. a
    multi-byte UTF-8 character is still incomplete). Concatenating all steps equals
    `Tokenizer.decode(all_ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._tok = tokenizer._tok
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        out = self._stream.step(self._tok, int(token_id))
        return out or ""


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with the model's BOS/EOS conventions and chat template."""

    def __init__(self, tokenizer: _HFTokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos_token: bool = False,
                 chat_template: str | None = None, named_chat_templates: dict[str, str] | None = None):
        """named_chat_templates: templates besides the default by name; as in transformers, a
        "tool_use" one renders the chats that offer tools."""
        self._tok = tokenizer
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self._chat_template = chat_template
        self._named_chat_templates = dict(named_chat_templates or {})

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`,
        `additional_chat_templates/*.jinja`, `generation_config.json` when present) from a HF model
        directory."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ModelLoadError(f"{path}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises Exception subclasses with terse messages
            raise ModelLoadError(f"{tok_file}: cannot load tokenizer ({e})") from None

        def read_json(name):
            p = os.path.join(path, name)
            if not os.path.isfile(p):
                return {}
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{p}: cannot parse ({e})") from None
            return d if isinstance(d, dict) else {}

        cfg = read_json("tokenizer_config.json")
        bos_id = eos_id = None
        bos = _token_content(cfg.get("bos_token"))
        if bos is not None:
            bos_id = tok.token_to_id(bos)
        eos = _token_content(cfg.get("eos_token"))
        if eos is not None:
            eos_id = tok.token_to_id(eos)
        eos_ids = [eos_id] if eos_id is not None else []
        gen_eos = read_json("generation_config.json").get("eos_token_id")
        if isinstance(gen_eos, int):
            eos_ids.append(gen_eos)
        elif isinstance(gen_eos, list):
            eos_ids.extend(i for i in gen_eos if isinstance(i, int))

        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:
            # Let tokenizer.json's post-processor decide (e.g. Llama 3's TemplateProcessing).
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id

        template, named = _split_chat_templates(cfg.get("chat_template"))
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        extra = os.path.join(path, "additional_chat_templates")   # transformers' files of named templates
        if os.path.isdir(extra):
            for name in sorted(os.listdir(extra)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra, name), encoding="utf-8") as f:
                        named[name.removesuffix(".jinja")] = f.read()
        return cls(tok, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos_token=add_bos,
                   chat_template=template, named_chat_templates=named)

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Build the byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata."""
        kind = _gguf_value(reader, "tokenizer.ggml.model")
        if kind is None:
            raise ModelConfigError("GGUF metadata is missing 'tokenizer.ggml.model'")
        if kind != "gpt2":
            raise ModelConfigError(
                f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)")
        tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise ModelConfigError("GGUF metadata is missing 'tokenizer.ggml.tokens'")
        merges = _gguf_value(reader, "tokenizer.ggml.merges")
        if merges is None:
            raise ModelConfigError("GGUF metadata is missing 'tokenizer.ggml.merges'")
        types = _gguf_value(reader, "tokenizer.ggml.token_type") or [_TOKEN_TYPE_NORMAL] * len(tokens)
        pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")

        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ModelConfigError(f"malformed BPE merge {m!r} in 'tokenizer.ggml.merges'")
            pairs.append((a, b))
        bpe = models.BPE(vocab, pairs, ignore_merges=(pre == "llama-bpe"))
        tok = _HFTokenizer(bpe)
        if pre in _DIGIT_SPLIT_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in ("qwen2", "llama-bpe"):
            regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            # "default"/"gpt2" and anything unknown: plain GPT-2 byte-level splitting.
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()

        special, user = [], []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == _TOKEN_TYPE_CONTROL:
                special.append(AddedToken(t, special=True, normalized=False))
            elif ty == _TOKEN_TYPE_USER_DEFINED:
                user.append(AddedToken(t, special=False, normalized=False))
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
        eos_ids = [_gguf_value(reader, k) for k in
                   ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = pre == "llama-bpe"  # llama.cpp's default for BPE vocabularies, except Llama 3
        named = {str(name): _gguf_value(reader, f"tokenizer.chat_template.{name}")
                 for name in _gguf_value(reader, "tokenizer.chat_templates", [])}
        return cls(tok, bos_token_id=None if bos is None else int(bos),
                   eos_token_ids=[int(i) for i in eos_ids if i is not None], add_bos_token=bool(add_bos),
                   chat_template=_gguf_value(reader, "tokenizer.chat_template"),
                   # a name listed without its template is dropped, as a nameless HF entry is
                   named_chat_templates={k: v for k, v in named.items() if isinstance(v, str)})

    def save(self, path: str | os.PathLike) -> list[str]:
        """Write this tokenizer as an HF directory that `from_hf_dir` reads back identically:
        `tokenizer.json` (the `tokenizers` model, added/special tokens included),
        `tokenizer_config.json` (the class transformers should load it as, bos and first eos token,
        add_bos_token, chat template) and `generation_config.json` (every EOS id, in order). Returns
        the file names written."""
        path = os.fspath(path)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos_token}
        if self._bos_token_id is not None:
            cfg["bos_token"] = self._tok.id_to_token(self._bos_token_id)
        if self._eos_token_ids:
            cfg["eos_token"] = self._tok.id_to_token(self._eos_token_ids[0])
        if self._named_chat_templates:
            default = [] if self._chat_template is None else [{"name": "default", "template": self._chat_template}]
            cfg["chat_template"] = default + [{"name": n, "template": t} for n, t in self._named_chat_templates.items()]
        elif self._chat_template is not None:
            cfg["chat_template"] = self._chat_template
        files = {"tokenizer_config.json": cfg,
                 "generation_config.json": {"eos_token_id": list(self._eos_token_ids)}}
        for name, data in files.items():
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
        return ["tokenizer.json", *files]

    # ---- properties ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        """The default chat template."""
        return self._chat_template

    @property
    def named_chat_templates(self) -> dict[str, str]:
        return dict(self._named_chat_templates)

    def chat_template_for(self, tools: bool) -> str | None:
        """The template a chat renders with: the "tool_use" one when it offers tools and the model has
        one (transformers' choice), else the default."""
        if tools and "tool_use" in self._named_chat_templates:
            return self._named_chat_templates["tool_use"]
        return self._chat_template

    @functools.cached_property
    def chat_template_renders_tools(self) -> bool:
        """Whether chats that offer tools render them through the template: it has a "tool_use"
        template, or the default reads a `tools` variable (HF's convention); False when it has none
        or does not parse."""
        if "tool_use" in self._named_chat_templates:
            return True
        if not self._chat_template:
            return False
        try:
            return "tools" in meta.find_undeclared_variables(_template_env().parse(self._chat_template))
        except TemplateError:
            return False

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # ---- encode / decode -------------------------------------------------------------------

    def backend_json(self) -> str:
        """The `tokenizers` tokenizer as its JSON text (what grammar engines build their own from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. `<|im_start|>`) map to their
        ids. BOS is prepended only if the model adds it and the text does not already start with it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self._bos_token_id):
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------

    def _special_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._tok.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render `messages` with the model's jinja chat template, the way HF transformers does (its
        "tool_use" template, where it has one, when `tools` are given)."""
        source = self.chat_template_for(template_vars.get("tools") is not None)
        if not source:
            raise ValueError("model has no chat template")
        validate_messages(messages)
        try:
            template = _compile_template(source)
        except TemplateError as e:
            raise ValueError(f"model's chat template is invalid: {e}") from None
        eos = self._eos_token_ids[0] if self._eos_token_ids else None
        variables = dict(template_vars)
        variables.update(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                         bos_token=self._special_text(self._bos_token_id), eos_token=self._special_text(eos))
        try:
            return template.render(**variables)
        except TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None
