"""vLLM-style offline API: `LLM(model=...).generate(prompts, sampling_params)` and `.chat(messages)`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Sequence as Seq

import jax
from tqdm.auto import tqdm

from models.loader import check_precision, load_model
from models.precision import PrecisionPreset
from models.quantize import model_weight_bytes
from models.tensor_parallel import check_tensor_parallel_size, shard_model, tp_mesh
from pallas_kernels.implementation import resolve_kernels
from serving.engine.llm_engine import EngineConfig, LLMEngine, engine_with_own_pool, pool_bytes_for_device
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.kv.pool_sizing import check_reports_memory, check_utilization, device_memory_stats

DEFAULT_KV_CACHE_BYTES = 512 << 20


def check_max_model_len(max_model_len) -> None:
    if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len <= 0):
        raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")


def engine_config(model_config, *, max_num_seqs: int = 32, max_model_len: int | None = None,
                  max_num_batched_tokens: int = 512, seed: int = 0, kernels: str = "auto", sparse=None,
                  sparse_dense_layers: int = 2, sparse_recall_every: int = 0,
                  enable_prefix_caching: bool = True, async_scheduling: bool = True,
                  mixed_steps: bool = True) -> EngineConfig:
    """Batching limits as in vLLM; max_model_len defaults to (and is capped at) the model's own."""
    check_max_model_len(max_model_len)
    limit = model_config.max_model_len if max_model_len is None else min(max_model_len, model_config.max_model_len)
    return EngineConfig(max_num_seqs=max_num_seqs, max_model_len=limit,
                        max_num_batched_tokens=max_num_batched_tokens,
                        prefill_chunk=max_num_batched_tokens, seed=seed, kernels=kernels, sparse=sparse,
                        sparse_dense_layers=sparse_dense_layers, sparse_recall_every=sparse_recall_every,
                        enable_prefix_caching=enable_prefix_caching, async_scheduling=async_scheduling,
                        mixed_steps=mixed_steps)


def group_devices(n, first: jax.Device | None = None) -> list:
    """The devices a model (or a fleet) of tensor_parallel_size `n` runs on: [first] (None: the
    default device) when n is 1, else `first` (default: the first device) and the devices after
    it in `jax.devices()`."""
    check_tensor_parallel_size(n)
    if n == 1:
        return [first]
    devices = jax.devices()
    start = 0 if first is None else devices.index(first)
    if start + n > len(devices):
        raise ValueError(f"tensor_parallel_size={n} needs {n} devices from {devices[start]}; this process has "
                         f"{len(devices) - start}")
    return devices[start:start + n]


class LLM:
    """One model on one device (or tensor parallel over several), with its own KV pool.

    Args:
      model: a known name (`smollm2-135m`), an HF checkpoint directory (float, or pre-quantized
        AWQ/GPTQ/FP8), a `.gguf` file, or a directory written by `fineserve quantize`.
      precision: "auto" (default) serves the checkpoint as it is: float checkpoints and GGUF files
        (dequantized) in bf16, pre-quantized AWQ/GPTQ/FP8 checkpoints straight in their int4/fp8
        formats, `fineserve quantize` output in its stored preset. "native" is "auto" but loads a
        GGUF file's Q4_0/Q4_1/Q8_0 linears straight into int4/int8. A preset name, "bf16", "w8a8",
        "fp8", "w4a16", "w4a8kv4" or "fireq" (see `models.precision`), quantizes a float checkpoint at
        load time, calibrated on the shipped text (see `models.loader.load_model` for the rules on
        already-quantized checkpoints).
      kv_dtype: KV cache format overriding the preset's: "bf16", "fp8", "int8", "int4" or "int4_fp8".
      kv_skip_layers: layers whose KV cache stays in the model dtype whatever its format (vLLM's
        kv_cache_dtype_skip_layers), e.g. [0] keeps the first layer's KV bf16 under int4 KV.
      dtype: "bfloat16" or "float32": compute dtype, and dtype of the unquantized weights and bf16 KV.
      calib_samples: calibration windows for quantized presets (0: plain round-to-nearest).
      kv_cache_bytes: size of the device KV pool (default 512 MiB), or, instead,
      gpu_memory_utilization: as vLLM's, the pool takes that fraction of the device's memory less the
        weights and a step's activations (`serving.kv.pool_sizing`; needs a GPU).
      max_num_seqs, max_model_len, max_num_batched_tokens: batching limits as in vLLM.
      tokens_per_page: KV page size in tokens.
      seed: engine seed, used for requests that do not set their own.
      kernels: "auto" (Pallas kernels on a GPU, the XLA references elsewhere), "xla", "pallas" or
        "interpret" (the Pallas kernels interpreted: any backend, slow).
      quantized_cache: a folder caching calibrated weights, so loading the same checkpoint and
        preset again skips calibration (`fineserve_jax.caches.Caches`); None: no cache.
      sparse: query-aware page selection for decoding (TinyServe/Quest), the requests' default: a
        dict like {"policy": "bbox", "budget_tokens": 1024} (policies "bbox", "bbox_span",
        "sink_window", "full"; or "budget_fraction"; "gate_tokens": dense up to that context,
        default twice the budget; "layer_weights": one weight per layer sharing the budget out over
        the layers, default even).
        Pages then keep their keys' bounds (2 x head_dim int8 codes per layer and kv head), and
        requests may choose their own (`SamplingParams.sparse`). None: off, no bounds kept.
      sparse_dense_layers: the first layers attend every page whatever the policy (default 2).
      sparse_recall_every: every that many decode steps, measure how many selected pages are among
        the pages dense attention weighs most (reads every page; `engine.stats.recall_*`); 0: never.
      enable_prefix_caching: reuse the KV pages of earlier requests' equal prefixes (full pages,
        vLLM's automatic prefix caching; idle cached pages are the first memory reclaimed).
      async_scheduling: launch each step before the previous step's tokens reach the host, so host
        work overlaps the device (vLLM's async scheduling); False waits for every step (debugging).
      mixed_steps: while sequences decode, a prompt's chunk runs in their step (at most
        max_num_batched_tokens tokens in all), so a long prompt never stalls them (vLLM's chunked
        prefill); False: prompts get steps of their own.
      tensor_parallel_size: split the model over the first that many devices (Megatron-style:
        `models.tensor_parallel`); the heads and MLP columns must divide evenly. The KV pool size
        (kv_cache_bytes or gpu_memory_utilization) is per device.
    """

    def __init__(self, model: str, precision: str | PrecisionPreset = "auto", dtype: str = "bfloat16", *,
                 kv_dtype: str | None = None, kv_skip_layers=None, kv_cache_bytes: int | None = None,
                 max_num_seqs: int = 32, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512, tokens_per_page: int = 16, seed: int = 0,
                 calib_samples: int = 8, kernels: str = "auto", quantized_cache: str | Path | None = None,
                 gpu_memory_utilization: float | None = None, sparse=None, sparse_dense_layers: int = 2,
                 sparse_recall_every: int = 0, tensor_parallel_size: int = 1, enable_prefix_caching: bool = True,
                 async_scheduling: bool = True, mixed_steps: bool = True):
        check_precision(precision, kv_dtype, kv_skip_layers)  # bad names fail before any loading
        devices = group_devices(tensor_parallel_size)
        if kv_cache_bytes is not None and (not isinstance(kv_cache_bytes, int) or kv_cache_bytes <= 0):
            raise ValueError(f"kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
        sized = kv_cache_bytes is None and gpu_memory_utilization is not None
        if gpu_memory_utilization is not None:
            check_utilization(gpu_memory_utilization)
        if sized:  # fail before loading anything where the device cannot say how much memory it has
            check_reports_memory(device_memory_stats(jax.devices()[0]))
        check_max_model_len(max_model_len)  # bad values fail before any loading
        resolve_kernels(kernels)
        EngineConfig(sparse=sparse, sparse_dense_layers=sparse_dense_layers, sparse_recall_every=sparse_recall_every,
                     enable_prefix_caching=enable_prefix_caching, async_scheduling=async_scheduling,
                     mixed_steps=mixed_steps)  # checks them
        loaded = load_model(model, dtype, precision, kv_dtype=kv_dtype, calib_samples=calib_samples,
                            quantized_cache=quantized_cache, kv_skip_layers=kv_skip_layers)
        config = engine_config(loaded.config, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                               max_num_batched_tokens=max_num_batched_tokens, seed=seed, kernels=kernels,
                               sparse=sparse, sparse_dense_layers=sparse_dense_layers,
                               sparse_recall_every=sparse_recall_every, enable_prefix_caching=enable_prefix_caching,
                               async_scheduling=async_scheduling, mixed_steps=mixed_steps)
        layout = loaded.kv_layout(tokens_per_page, key_bounds=config.sparse is not None)
        if sized:
            kv_cache_bytes = pool_bytes_for_device(jax.devices()[0], gpu_memory_utilization,
                                                   [(loaded.model, layout, config)])
        if tensor_parallel_size > 1:   # only its shards stay, one per device
            shard_model(loaded.model, tp_mesh(devices))
        engine = engine_with_own_pool(
            loaded.model, config, layout=layout, kv_cache_bytes=kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
            tokenizer=loaded.tokenizer,
            eos_token_ids=loaded.eos_token_ids, model_key=str(model), devices=devices)
        self._bind(str(model), loaded, engine, engine.step)

    @classmethod
    def over_engine(cls, name: str, loaded, engine: LLMEngine, step: Callable[[], list[RequestOutput]]) -> LLM:
        """The LLM API over an engine that lives elsewhere (a model of a `Fleet`): `step` advances
        whatever runs the engine and returns this engine's outputs."""
        llm = cls.__new__(cls)
        llm._bind(name, loaded, engine, step)
        return llm

    def _bind(self, name, loaded, engine, step) -> None:
        self.model_name = name
        self.precision = loaded.precision
        self.weight_bytes = model_weight_bytes(loaded.model)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.engine = engine
        self._step = step

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        requests = self._prepare(prompts, sampling_params, prompt_token_ids)
        return self._run(requests, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """`messages` is one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat templates are unavailable")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages or [])
        if not conversations:
            raise ValueError("chat needs at least one conversation")
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                 for c in conversations]
        # The template already holds every special token the model expects.
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        requests = self._prepare(None, sampling_params, ids, texts)
        return self._run(requests, use_tqdm)

    def generate_stream(self, prompt: str | Seq[int], sampling_params: SamplingParams | None = None
                        ) -> Iterator[RequestOutput]:
        """Yield the growing output of one request after each token (the last one is finished)."""
        (ids, text, params), = self._prepare(
            [prompt] if isinstance(prompt, str) else None, sampling_params,
            None if isinstance(prompt, str) else [prompt])
        if params.n != 1:
            raise ValueError("generate_stream supports n=1 only")
        rid = self.engine.add_request(ids, params, prompt=text)
        while True:
            for out in self._step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    # ---- helpers -------------------------------------------------------------------------------
    def _prepare(self, prompts, sampling_params, prompt_token_ids, texts=None):
        """Validate every input before queueing any, so a bad one loses nothing."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompts must be strings (use prompt_token_ids= for token ids)")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt_token_ids instead")
            ids = [self.tokenizer.encode(p) for p in prompts]
            texts = list(prompts)
        else:
            ids = [list(p) for p in prompt_token_ids]
            texts = texts or [None] * len(ids)
        if not ids:
            raise ValueError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} sampling params for {len(ids)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        for i, x in enumerate(ids):
            try:
                self.engine.validate_prompt(x)
            except ValueError as e:
                raise type(e)(f"prompt {i}: {e}") from None
        return list(zip(ids, texts, params))

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        groups = self._add(requests)
        try:
            finished: dict[str, RequestOutput] = {}
            bar = None
            if use_tqdm:
                bar = tqdm(total=sum(len(g) for g in groups), desc="generate", unit="req")
            while self.engine.has_unfinished_requests():
                for out in self._step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            self._abort(groups)
            raise
        return self._collect(groups, finished)

    def _add(self, requests) -> list[list[str]]:
        """Queue prepared requests; one group of request ids per prompt (n > 1 samples: n requests)."""
        groups: list[list[str]] = []
        try:
            for ids, text, params in requests:
                groups.append(self.engine.add_samples(ids, params, prompt=text))
        except BaseException:
            self._abort(groups)
            raise
        return groups

    def _abort(self, groups: list[list[str]]) -> None:
        for g in groups:
            for rid in g:
                self.engine.abort_request(rid)

    @staticmethod
    def _collect(groups: list[list[str]], finished: dict[str, RequestOutput]) -> list[RequestOutput]:
        results = []
        for g in groups:
            first = finished[g[0]]
            outs = [dataclasses.replace(finished[rid].outputs[0], index=i) for i, rid in enumerate(g)]
            results.append(RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outs, True,
                                         first.metrics))
        return results
