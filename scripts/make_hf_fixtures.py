"""Build tiny random Hugging Face models + reference outputs for parity tests.

Run (from the repository root, in the torch-enabled side venv)::

    .venv-hf/bin/python scripts/make_hf_fixtures.py

The side venv is created with::

    ~/.pyenv/versions/3.11.7/bin/python -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers safetensors numpy tokenizers

It writes, under ``tests/fixtures/hf/``, three tiny float32 models
(``llama/`` sharded with llama3 RoPE scaling, ``mistral/``, ``qwen2/`` with
q/k/v biases and tied embeddings), each with a small byte-level BPE
``tokenizer.json`` + ``tokenizer_config.json`` (ChatML chat template) and a
``reference.npz`` holding HF's logits and greedy tokens for two prompts.

Nothing is downloaded: all weights are random (fixed seeds) and the tokenizer
is trained on the inline text below.  Importing this module has no side
effects; tests may call :func:`compute_reference` to recompute the reference
arrays live from a saved model directory when torch is importable.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "hf"

VOCAB_SIZE = 320
PROMPT_LENS = (13, 5)
N_GREEDY = 32
MIN_MARGIN = 1e-2  # stricter than needed (1e-3): tolerates TF32/low-precision matmul drift

# Special tokens: fixed ids 0..4 (trainer puts special tokens first, in order).
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and "
    "the fox ran into the forest, where the trees were tall and the air was cold.",
    "Serving large language models efficiently requires careful management of the "
    "key value cache. Pages of memory are shared between requests, and the "
    "scheduler decides which sequences run in each step of the engine.",
    "Once upon a time there was a small robot who wanted to learn how to paint. "
    "Every morning it mixed the colors red, green and blue, and every evening it "
    "showed its paintings to the other robots in the workshop.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris. "
    "It is known for the Eiffel Tower, the Louvre museum, and its many cafes.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "In 1969 the first humans walked on the moon. Numbers like 3.14159 and 2.71828 "
    "appear everywhere in mathematics, physics and engineering.",
    "Hello! How are you today? I am fine, thank you. Let us talk about the weather: "
    "it is sunny, warm and bright, with a light breeze from the sea.",
]

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    pad_token_id=PAD_ID,
)

# name -> spec.  "seed" is the first seed tried; bumped if a margin check fails.
MODELS = {
    "llama": dict(
        arch="LlamaForCausalLM",
        seed=1234,
        config=dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=BOS_ID,
            eos_token_id=[EOS_ID, IM_END_ID],
        ),
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        max_shard_size="600KB",
    ),
    "mistral": dict(
        arch="MistralForCausalLM",
        seed=2345,
        config=dict(
            rope_theta=10000.0,
            sliding_window=4096,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        ),
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        max_shard_size=None,
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM",
        seed=3456,
        config=dict(
            rope_theta=1000000.0,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=BOS_ID,
            eos_token_id=IM_END_ID,
        ),
        bos_token="<s>",
        eos_token="<|im_end|>",
        add_bos_token=False,
        max_shard_size=None,
    ),
}


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def build_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab = tok.get_vocab()
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert vocab[s] == i, (s, vocab[s])
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    return tok


def write_tokenizer(model_dir: Path, spec: dict) -> None:
    tok = build_tokenizer(spec["add_bos_token"])
    tok.save(str(model_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos_token"],
        "eos_token": spec["eos_token"],
        "pad_token": "<pad>",
        "unk_token": None,
        "add_bos_token": spec["add_bos_token"],
        "add_eos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def build_model(spec: dict, seed: int):
    import torch
    import transformers

    cls = getattr(transformers, spec["arch"])
    config_cls = cls.config_class
    config = config_cls(**COMMON, **spec["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def _forward_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


def _reference_for_prompts(model, prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
    ref: dict[str, np.ndarray] = {}
    for i, ids in enumerate(prompts):
        ids = [int(t) for t in ids]
        ref[f"ids_{i}"] = np.asarray(ids, dtype=np.int32)
        ref[f"logits_{i}"] = _forward_logits(model, ids).astype(np.float32)
        seq = list(ids)
        toks, step_logits = [], []
        for _ in range(N_GREEDY):
            last = _forward_logits(model, seq)[-1]
            t = int(np.argmax(last))
            step_logits.append(last)
            toks.append(t)
            seq.append(t)
        ref[f"greedy_{i}"] = np.asarray(toks, dtype=np.int32)
        ref[f"greedy_logits_{i}"] = np.stack(step_logits).astype(np.float32)
    return ref


def compute_reference(model_dir: str) -> dict[str, np.ndarray]:
    """Recompute the reference arrays with HF transformers (torch, float32).

    Loads the saved model in ``model_dir`` and the prompts ``ids_0``/``ids_1``
    from ``model_dir/reference.npz``; returns a dict with the same keys as that
    file: ids_i [L] int32, logits_i [L, vocab] f32, greedy_i [32] int32,
    greedy_logits_i [32, vocab] f32.
    """
    with np.load(os.path.join(model_dir, "reference.npz")) as z:
        n = sum(1 for k in z.files if k.startswith("ids_"))
        prompts = [z[f"ids_{i}"] for i in range(n)]
    return _reference_for_prompts(_load(model_dir), prompts)


def min_margin(ref: dict[str, np.ndarray]) -> float:
    """Smallest top1 - top2 gap over all greedy steps."""
    m = np.inf
    for k, v in ref.items():
        if k.startswith("greedy_logits_"):
            s = np.sort(v, axis=-1)
            m = min(m, float(np.min(s[:, -1] - s[:, -2])))
    return m


def make_one(name: str, spec: dict, max_tries: int = 200) -> dict:
    model_dir = OUT_DIR / name
    seed = spec["seed"]
    for _ in range(max_tries):
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        model = build_model(spec, seed)
        kw = {}
        if spec["max_shard_size"]:
            kw["max_shard_size"] = spec["max_shard_size"]
        model.save_pretrained(str(model_dir), **kw)
        write_tokenizer(model_dir, spec)

        rng = np.random.default_rng(seed)
        prompts = [rng.integers(0, VOCAB_SIZE, size=n).astype(np.int32) for n in PROMPT_LENS]
        # Reference computed from the *reloaded* checkpoint, so it reflects disk.
        ref = _reference_for_prompts(_load(str(model_dir)), prompts)
        # Sanity: reload matches the in-memory model.
        np.testing.assert_allclose(
            ref["logits_0"], _forward_logits(model, [int(t) for t in prompts[0]]), rtol=0, atol=1e-5
        )
        margin = min_margin(ref)
        if margin >= MIN_MARGIN:
            np.savez(model_dir / "reference.npz", **ref)
            return dict(name=name, seed=seed, first_seed=spec["seed"], margin=margin)
        print(f"[{name}] seed {seed}: min margin {margin:.2e} < {MIN_MARGIN}, retrying", file=sys.stderr)
        seed += 1
    raise RuntimeError(f"{name}: no seed with margin >= {MIN_MARGIN} in {max_tries} tries")


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    import torch
    import transformers

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results = [make_one(name, spec) for name, spec in MODELS.items()]

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for r in results:
        d = OUT_DIR / r["name"]
        print(f"\n== {r['name']}: seed {r['seed']} (first tried {r['first_seed']}), "
              f"min top1-top2 margin {r['margin']:.4f}")
        for f in sorted(d.iterdir()):
            print(f"  {f.stat().st_size:>10,d}  {f.name}")
        print(f"  {_size(d):>10,d}  total")
    print(f"\ntotal {OUT_DIR}: {_size(OUT_DIR):,d} bytes")


if __name__ == "__main__":
    main()
