"""`fineserve serve` as a user runs it: a process serving the real SmolLM2-135M from a fleet file,
answered through the official `openai` client, stopped with SIGTERM (exit status 0)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.server_helpers import SMOLLM2_GGUF

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fineserve_serve_answers_and_stops_cleanly_on_sigterm(tmp_path):
    assert SMOLLM2_GGUF.exists(), "run scripts/setup.sh first"
    config = tmp_path / "fleet.toml"
    config.write_text('pool_bytes = "64MiB"\n[server]\ndrain_timeout_s = 5\n'
                      '[[models]]\nmodel = "smollm2-135m"\nprecision = "bf16"\nmax_model_len = 512\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fineserve_jax.cli", "serve", "--config", str(config),
                             "--port", str(port), "--no-warmup"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2-135m-bf16"]
        r = client.chat.completions.create(model="smollm2-135m-bf16", temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(ln.split("fineserve.requests: ", 1)[1]) for ln in err.splitlines() if "fineserve.requests: " in ln]
    assert [(ln["model"], ln["status"], ln["output_tokens"]) for ln in lines] == [
        ("smollm2-135m-bf16", "ok", r.usage.completion_tokens)]
