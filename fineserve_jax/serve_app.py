"""The OpenAI app over a process's fleets: each device's models behind its AsyncRuntime (engine
thread), warmed up. `fineserve serve` runs it under uvicorn; on a Ray cluster each replica runs it
for its device (fineserve_jax/ray_serve.py)."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from tqdm.auto import tqdm

from fineserve_jax.fleet import Fleet
from serving.http.api_server import ServedModel, build_app
from serving.runtime.async_runtime import AsyncRuntime, ModelLimits

log = logging.getLogger("fineserve.serve")


def served_models(fleet: Fleet, *, slo_ttft_s: dict[str, float], max_queue: dict[str, int], device=None,
                  device_name: str = "device0") -> dict[str, ServedModel]:
    """The fleet's models behind one AsyncRuntime (the fleet's engine thread on `device`)."""
    engines = fleet.runtime.engines
    limits = {name: ModelLimits(max_pending=e.config.max_num_seqs + max_queue[name]) for name, e in engines.items()}
    runtime = AsyncRuntime(fleet.runtime, limits, device=device, name=device_name)
    return {name: ServedModel(runtime, fleet.loaded[name].tokenizer, e.config.max_model_len, e.validate_prompt,
                              e.validate_params, precision=fleet.loaded[name].precision.name,
                              kv_dtype=fleet.loaded[name].kv_dtype, slo_ttft_s=slo_ttft_s[name],
                              tool_call_parser=fleet.specs[name].tool_call_parser)
            for name, e in engines.items()}


def app_for(device_fleets, server_config, *, drain_timeout_s: float | None = None, warmup: bool = True) -> FastAPI:
    """One app over every device's fleet (serve_config.DeviceFleet, each already scheduled as the
    config's [server] says), warmed up unless told not to."""
    models: dict[str, ServedModel] = {}
    for df in device_fleets:
        if warmup:
            for name, engine in df.fleet.runtime.engines.items():
                t0 = time.perf_counter()
                with tqdm(total=engine.runner.num_buckets, desc=f"warming up {name}", unit="shape") as bar:
                    engine.warmup(progress=bar.update)
                log.info("warmed up %s on %s in %.1f s", name, df.device_name, time.perf_counter() - t0)
        models |= served_models(df.fleet, slo_ttft_s=df.slo_ttft_s, max_queue=df.max_queue,
                                device=df.jax_device, device_name=df.device_name)
    drain = drain_timeout_s if drain_timeout_s is not None else server_config.drain_timeout_s
    return build_app(models, drain_timeout_s=drain)
