"""A real server on 127.0.0.1 over tiny random models with SmolLM2's tokenizer (fast on CPU).

The models are random, so their text is gibberish, but every path is the served one: the fleet's
shared KV Slab pool, the engine thread, uvicorn, the OpenAI wire format."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import gguf

from fineserve_jax.fleet import Fleet, ModelSpec
from fineserve_jax.serve_app import served_models
from fineserve_jax.serve_config import ServerConfig
from models.config import ModelConfig
from models.loader import model_cache_dir, random_model
from models.tokenizer import Tokenizer
from serving.http.api_server import build_app, make_server

SMOLLM2_GGUF = model_cache_dir() / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_MODEL_LEN = 96


def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(str(SMOLLM2_GGUF)))


def tiny_models(tok: Tokenizer, precisions=("bf16", "w8a8", "w4a16")):
    """One tiny random model per precision (different depths), with a real tokenizer."""
    out = []
    for i, p in enumerate(precisions):
        cfg = ModelConfig("llama", tok.vocab_size, 64, 128, 2 + i, 4, 2, 16, max_position_embeddings=1024)
        m = random_model(cfg, p, "float32", name=f"tiny-{p}", seed=i)
        m.tokenizer = tok
        out.append(m)
    return out


@dataclass
class RunningServer:
    url: str
    server: object  # serving.http.api_server.GracefulServer
    thread: threading.Thread
    fleet: Fleet

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def state(self):
        return self.server.fineserve  # the app's _Server: models, runtimes, metrics

    def engine(self, name: str):
        return self.fleet.runtime.engines[name]

    def used_pages(self, model: str | None = None) -> int:
        """KV pages held, as the engine thread last published them (it owns the allocator)."""
        snap = self.state.runtimes[0].snapshot["models"]
        return sum(m["used_pages"] for name, m in snap.items() if model in (None, name))

    def shutdown(self, timeout: float = 60) -> None:
        self.server.handle_exit(15, None)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def running_server(models, *, max_queue: int = 8, max_num_seqs: int = 4, drain_timeout_s: float = 5.0,
                   slo_ttft_s: float = 5.0, pool_bytes: str = "8MiB", step_costs: dict | None = None,
                   admission: str = "fcfs", drop_hopeless: bool = False, step_policy: str = "edf",
                   model_options: dict[str, dict] | None = None):
    """The server as `fineserve serve` runs it (its default scheduling unless told otherwise);
    `model_options`: more ModelSpec settings by model name."""
    specs = [ModelSpec(m, **(dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=32, max_model_len=MAX_MODEL_LEN,
                                  tokens_per_page=8) | (model_options or {}).get(m.name, {}))) for m in models]
    names = [s.served_name for s in specs]
    slos = {n: slo_ttft_s for n in names}
    server = ServerConfig(admission=admission, drop_hopeless=drop_hopeless, step_policy=step_policy)
    fleet = Fleet(specs, pool_bytes, scheduling=server.scheduling(slos, step_costs or {}))
    app = build_app(served_models(fleet, slo_ttft_s=slos, max_queue={n: max_queue for n in names}),
                    drain_timeout_s=drain_timeout_s)
    server = make_server(app, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = RunningServer(f"http://127.0.0.1:{port}", server, thread, fleet)
    try:
        yield running
    finally:
        if thread.is_alive():
            running.shutdown()


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
