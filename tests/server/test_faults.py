"""Faults: a client that disconnects aborts its request and its KV blocks return to the pool; a
failing engine step fails the requests in flight (500, or an SSE error event) and the server
goes on; the API key is enforced on every route but /health."""

import json

import httpx
import pytest

pytestmark = pytest.mark.slow
LONG = {"prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0.0, "ignore_eos": True}
ABORTED = "kiln_request_success_total{finished_reason=abort}"


def data_events(response: httpx.Response):
    """The JSON (or "[DONE]") payloads of an SSE response, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


def test_disconnect_mid_stream_frees_kv_blocks(server):
    before = server.wait_idle()
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            events = data_events(response)
            for _ in range(3):
                assert next(events)["choices"][0]["finish_reason"] is None
            during = server.metrics()
            assert during["kiln_num_requests_running"] == 1 and during["kiln_kv_cache_blocks_used"] > 0
    # the client and its connection are closed here, 3 tokens into 400
    after = server.wait_idle()
    assert after["kiln_kv_cache_blocks_free"] == before["kiln_kv_cache_blocks_free"]
    assert after[ABORTED] - before.get(ABORTED, 0) == 1
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] < LONG["max_tokens"]


def test_disconnect_while_waiting_for_a_whole_response(server):
    before = server.wait_idle()
    with server.http(timeout=httpx.Timeout(120, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):  # gives up (and disconnects) after 1 s of a ~15 s request
            http.post("/v1/completions", json=LONG)
    after = server.wait_idle()
    assert after["kiln_kv_cache_blocks_free"] == before["kiln_kv_cache_blocks_free"]
    assert after[ABORTED] - before.get(ABORTED, 0) == 1


@pytest.fixture
def failing_executor(server, monkeypatch):
    """Every model step raises until the test ends (the executor is swapped, not the engine)."""
    def execute(batch):
        raise RuntimeError("injected executor fault")

    monkeypatch.setattr(server.llm.executor, "execute", execute)
    return monkeypatch


def test_engine_error_fails_the_request_not_the_server(server, failing_executor):
    before = server.wait_idle()
    with server.http() as http:
        response = http.post("/v1/completions", json={**LONG, "max_tokens": 4})
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "injected executor fault" in error["message"]
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}) as streamed:
            assert streamed.status_code == 200
            events = list(data_events(streamed))
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "injected executor fault" in events[1]["error"]["message"] and events[2:] == ["[DONE]"]
        failing_executor.undo()
        after = server.wait_idle()
        assert after["kiln_kv_cache_blocks_free"] == before["kiln_kv_cache_blocks_free"]
        response = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
        assert http.get("/health").status_code == 200


def test_failing_add_request_answers_500(server, monkeypatch):
    """An unexpected exception while adding a request answers that request; nothing hangs."""
    def add_request(*args, **kwargs):
        raise RuntimeError("injected add_request fault")

    monkeypatch.setattr(server.llm.engine, "add_request", add_request)
    with server.http(timeout=30) as http:
        response = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert response.status_code == 500 and "injected add_request fault" in response.json()["error"]["message"]
        monkeypatch.undo()
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}],
                         ids=["no-key", "wrong-key", "no-bearer"])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")])
def test_api_key_required(server, headers, method, path):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.request(method, path, headers=headers, json={"prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
