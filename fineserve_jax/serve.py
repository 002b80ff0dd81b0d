"""`fineserve serve [--config fleet.toml] [--host H] [--port P] [--ray [ADDRESS]]`: the OpenAI-compatible server.

With no config it serves the built-in demo fleet (SmolLM2-135M as smollm2-135m-bf16, -w8a8 and
-w4a16 sharing one device pool). A config lists models, precisions, devices, SLOs and pool sizes
(see fineserve_jax/serve_config.py); the global scheduler places the models on the devices, each
device runs one Fleet (one KV Slab pool) on its own engine thread, and one HTTP app serves them all.
Each device is scheduled as `[server] admission/drop_hopeless/step_policy` say: by default FCFS
admission and FineServe's latency-aware EDF between models; `admission = "saab"` adds its SLO-aware
batching where the device's cost profile covers the model. With `--ray`, the same fleet is placed
over a Ray cluster's devices and served by Ray Serve (fineserve_jax/ray_serve.py); without it Ray is
never imported. Design notes: docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from fineserve_jax.caches import RUNTIME_CACHE_ENV, Caches
from fineserve_jax.config_files import read_toml
from fineserve_jax.serve_app import app_for
from fineserve_jax.serve_config import ServeConfig, build_fleets
from serving.http.api_server import make_server
from serving.kv.pool_sizing import check_utilization

log = logging.getLogger("fineserve.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fineserve serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="fleet TOML (default: the built-in demo fleet)")
    p.add_argument("--host", default=None, help="bind address (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's, else 8000)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds in-flight requests get to finish on SIGTERM before they are failed")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every model's programs at start")
    p.add_argument("--cache-dir", default=None,
                   help=f"where compiled programs and calibrated weights are cached for fast restarts "
                        f"(default: ${RUNTIME_CACHE_ENV}, else runtime/ in the model cache)")
    p.add_argument("--no-cache", action="store_true", help="compile and calibrate from scratch, cache nothing")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="size each device's KV pool to this fraction of its memory, less weights and a step's "
                        "activations (as vLLM; devices whose [[devices]] entry sets pool_bytes keep it)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="serve over a Ray cluster with Ray Serve: join it (ADDRESS = HOST:PORT of its head; "
                        "without it, the cluster this machine belongs to), place the models over its devices, "
                        "one replica per device behind one endpoint (default: the config's [server] ray_address)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLogger().level))  # orbax's chatter
    try:
        utilization = args.gpu_memory_utilization
        if utilization is not None:
            check_utilization(utilization)
        elif args.config:  # the file's, read before JAX starts (parsing the config starts it)
            utilization = read_toml(args.config, "serve config").get("gpu_memory_utilization")
    except ValueError as e:
        print(f"fineserve: error: {e}", file=sys.stderr)
        return 2
    if isinstance(utilization, float) and 0 < utilization <= 1:  # JAX's limit is then the pools' budget
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(utilization))
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    caches = Caches.from_flags(args.no_cache, args.cache_dir)
    caches.enable_compilation_cache()
    try:
        config = ServeConfig.from_toml(args.config) if args.config else ServeConfig.demo()
        ray_address = args.ray if args.ray is not None else config.server.ray_address
        if ray_address is not None:
            from fineserve_jax.ray_serve import serve_on_ray
            return serve_on_ray(config, ray_address, host=args.host or config.server.host,
                                port=args.port if args.port is not None else config.server.port,
                                warmup=not args.no_warmup, caches=caches)
        t0 = time.perf_counter()
        fleets = build_fleets(config, quantized_cache=caches.quantized,
                              gpu_memory_utilization=args.gpu_memory_utilization)
    except (ValueError, OSError) as e:
        print(f"fineserve: error: {e}", file=sys.stderr)
        return 2
    log.info("loaded %d model(s) on %d device(s) in %.1f s", sum(len(f.fleet.model_names) for f in fleets),
             len(fleets), time.perf_counter() - t0)
    server_cfg = config.server
    app = app_for(fleets, server_cfg, drain_timeout_s=args.drain_timeout, warmup=not args.no_warmup)
    host = args.host or server_cfg.host
    port = args.port if args.port is not None else server_cfg.port
    log.info("serving %s on http://%s:%d/v1", ", ".join(app.state.server.models), host, port)
    make_server(app, host, port, log_level=args.log_level).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
