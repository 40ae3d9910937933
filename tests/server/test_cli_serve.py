"""`kiln serve` as a user runs it: a subprocess on a free loopback port, no API key, a served
model name; its greedy output equals the Python API's; Ctrl-C stops it cleanly."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "kiln serve exited before serving"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"kiln serve not healthy after {timeout} s"
        time.sleep(0.25)


def test_kiln_serve(llm, references, reference_requests, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "kiln.cli", "serve", str(llm.artifact.path), "--port", str(port),
               "--max-model-len", "256", "--kv-cache-memory", "32", "--max-num-seqs", "4",
               "--served-model-name", "tiny"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        prompt, params = reference_requests["cli"]
        with httpx.Client(base_url=url, timeout=60) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
            response = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "temperature": 0.0,
                                                          "max_tokens": params.max_tokens})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == references["cli"].outputs[0].text
            assert http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi"}).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode == 0, log
    assert f"Uvicorn running on {url}" in log  # bound to loopback by default
