"""`kiln serve` as a user runs it: a subprocess on a free loopback port, no API key, a served
model name; its greedy output equals the Python API's; Ctrl-C stops it cleanly; SIGTERM during
streams drains them: each ends with its final event or an error event, then `data: [DONE]`."""

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


DRAIN_S = 4.0
LONG_TOKENS, SHORT_TOKENS = 200, 8  # at least ~4 s and well under 1 s of decoding on a CPU


class Stream(threading.Thread):
    """One streamed request, read to its end: its `data:` payloads (JSON, or "[DONE]") in order;
    `started` is set at the first token."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, {**body, "stream": True}
        self.events: list = []
        self.started = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            with http.stream("POST", self.path, json=self.body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        payload = line[len("data: "):]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        if token_text(self.events[-1]):
                            self.started.set()


def token_text(event) -> str:
    """The text a completions or chat chunk adds; "" for any other event."""
    choices = event.get("choices") if isinstance(event, dict) else None
    return (choices[0].get("text") or choices[0].get("delta", {}).get("content") or "") if choices else ""


def test_sigterm_drains_streams(llm, tmp_path):
    """8 streams and a whole response run when SIGTERM comes: the short streams finish, the
    long ones (and the whole response) end with the shutdown error after DRAIN_S; a new request
    meanwhile gets 503; every KV block is free at the end and the process exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "kiln.cli", "serve", str(llm.artifact.path), "--port", str(port),
               "--max-model-len", "256", "--kv-cache-memory", "128", "--max-num-seqs", "16",
               "--drain-timeout", str(DRAIN_S)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        fields = {"temperature": 0.0, "ignore_eos": True}
        long_streams = [Stream(url, "/v1/completions", {"prompt": f"Story {i}:", "max_tokens": LONG_TOKENS, **fields})
                        for i in range(3)]
        long_streams += [Stream(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Tell story {i}."}], "max_tokens": LONG_TOKENS, **fields})
            for i in range(3)]
        short_streams = [Stream(url, "/v1/completions", {"prompt": f"Short {i}:", "max_tokens": SHORT_TOKENS,
                                                         **fields}) for i in range(2)]
        streams = long_streams + short_streams
        with httpx.Client(base_url=url, timeout=120) as http, ThreadPoolExecutor(1) as pool:
            pending_whole = pool.submit(http.post, "/v1/completions",
                                        json={"prompt": "A whole story:", "max_tokens": LONG_TOKENS, **fields})
            for stream in streams:
                stream.start()
            for stream in streams:
                assert stream.started.wait(120), "a stream produced no token"
            proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            refused = None
            while refused is None and time.monotonic() - stopped_at < DRAIN_S:
                response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                refused = response if response.status_code == 503 else None
            assert refused is not None, "no 503 for a new request while draining"
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert "shutting down" in refused.json()["error"]["message"]
            for stream in streams:
                stream.join(DRAIN_S + 60)
            whole = pending_whole.result(timeout=DRAIN_S + 60)
            assert proc.wait(timeout=DRAIN_S + 60) == 0
            exited_after = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    for stream in streams:
        *chunks, last, done = stream.events
        assert done == "[DONE]", stream.events[-3:]
        if stream in short_streams:  # finished within the drain
            assert last["choices"][0]["finish_reason"] == "length", last
        else:  # still running at the drain's end
            assert last["error"]["code"] == "server_shutting_down", last
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "server_shutting_down"
    assert exited_after < DRAIN_S + 15, log
    free, total = map(int, re.search(r"engine stopped; (\d+) of (\d+) KV-cache blocks free", log).groups())
    assert free == total, log
