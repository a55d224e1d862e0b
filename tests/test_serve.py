"""The HTTP server in process (Starlette's TestClient) on a tiny random model: every endpoint, SSE framing,
batching, back-pressure, timeouts, auth and limits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the server tests need the `serve` extra")
pytest.importorskip("prometheus_client", reason="the server tests need the `serve` extra")


from cpmbee.generation import generate
from cpmbee.serve import Limits
from cpmbee.serve.openai import conversation_to_cpmbee
from cpmbee.serve.protocol import ChatMessage

from .serve_helpers import Gate, metric, parse_sse, serving, tiny_model

PROMPT = {"input": "今天天气不错", "question": "the", "<ans>": ""}
TWO_SLOTS = {"input": "the question", "<ans>": {"a": "", "b": ""}}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer)


@pytest.fixture
def client(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer) as c:
        yield c


# ---------------------------------------------------------------------------------------------- /v1/generate
@pytest.mark.parametrize(
    "options", [{"beam_size": 1, "max_new_tokens": 6}, {"beam_size": 3, "max_new_tokens": 6}]
)
def test_generate_answers_like_the_library(client, model, tiny_tokenizer, options):
    r = client.post("/v1/generate", json={"input": PROMPT, "options": options})
    assert r.status_code == 200, r.text
    assert r.json() == {"output": generate(model, tiny_tokenizer, PROMPT, **options)}
    r = client.post("/v1/generate", json={"input": [PROMPT, TWO_SLOTS], "options": options})
    assert r.json()["output"] == generate(model, tiny_tokenizer, [PROMPT, TWO_SLOTS], **options)


def test_generate_stream_sse_framing(client, model, tiny_tokenizer):
    body = {"input": [PROMPT, TWO_SLOTS], "options": {"max_new_tokens": 8}, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = parse_sse(text)
    assert events[-1][0] == "end"
    expected = generate(model, tiny_tokenizer, [PROMPT, TWO_SLOTS], beam_size=1, max_new_tokens=8)
    assert events[-1][1] == {"output": expected}
    increments = [d for e, d in events if e == "message" and not d["done"]]
    done = {d["index"]: d["result"] for e, d in events if e == "message" and d["done"]}
    assert done == {0: expected[0], 1: expected[1]}
    assert "".join(d["text"] for d in increments if d["index"] == 0) == expected[0]["<ans>"]
    slot_a = "".join(d["text"] for d in increments if d["index"] == 1 and d["path"] == ["a"])
    assert slot_a == expected[1]["<ans>"]["a"]


def test_stream_with_beam_search_is_refused(client):
    r = client.post("/v1/generate", json={"input": PROMPT, "options": {"beam_size": 2}, "stream": True})
    assert r.status_code == 422 and r.json()["error"]["param"] == "options.beam_size"


# ---------------------------------------------------------------------------------------------- OpenAI
def test_completions(client, model, tiny_tokenizer):
    r = client.post("/v1/completions", json={"prompt": ["the", "今天"], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    expected = generate(
        model,
        tiny_tokenizer,
        [{"input": "the", "<ans>": ""}, {"input": "今天", "<ans>": ""}],
        beam_size=1,
        max_new_tokens=5,
    )
    assert [c["text"] for c in body["choices"]] == [e["<ans>"] for e in expected]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    usage = body["usage"]
    assert (
        usage["prompt_tokens"] > 0
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )


def test_completions_stream_ends_with_done(client):
    body = {
        "prompt": "the",
        "max_tokens": 4,
        "temperature": 0,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", json=body)
    events = parse_sse(r.text)
    assert events[-1] == ("message", "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    finals = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1]
    texts = [
        "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i) for i in (0, 1)
    ]
    assert texts[0] == texts[1]  # greedy: both choices agree
    assert all(c["object"] == "text_completion" for c in chunks)


def test_chat_completions(client, model, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "the question"}]},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    data = {
        "system": "be brief",
        "history": {"1": {"user": "hi", "assistant": "hello"}},
        "input": "the question",
        "<ans>": "",
    }
    assert choice["message"] == {
        "role": "assistant",
        "content": generate(model, tiny_tokenizer, data, beam_size=1, max_new_tokens=6)["<ans>"],
    }
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    )
    events = parse_sse(r.text)
    assert events[-1][1] == "[DONE]"
    deltas = [d["choices"][0]["delta"] for _, d in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == choice["message"]["content"]
    assert events[-2][1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_conversation_layout():
    def msgs(*pairs):
        return [ChatMessage(role=r, content=c) for r, c in pairs]

    assert conversation_to_cpmbee(msgs(("user", "a"))) == {"input": "a", "<ans>": ""}
    assert conversation_to_cpmbee(
        msgs(
            ("assistant", "x"),
            ("user", "a"),
            ("user", "b"),
            ("developer", "d"),
            ("assistant", "y"),
            ("assistant", "z"),
            ("user", "c"),
        )
    ) == {
        "system": "d",
        "history": {"1": {"user": "", "assistant": "x"}, "2": {"user": "a\nb", "assistant": "y\nz"}},
        "input": "c",
        "<ans>": "",
    }


def test_sampling_with_seed_reproduces(client):
    body = {"prompt": "the", "max_tokens": 6, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first


def test_models_health_metrics_openapi(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "cpmbee"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    client.post("/v1/generate", json={"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 3}})
    text = client.get("/metrics").text
    for name in (
        "cpmbee_requests_total",
        "cpmbee_request_duration_seconds_bucket",
        "cpmbee_queue_depth",
        "cpmbee_batch_rows_bucket",
        "cpmbee_generated_tokens_total",
        "cpmbee_prompt_tokens_total",
    ):
        assert name in text
    assert metric(text, "cpmbee_requests_total", 'endpoint="/v1/generate",status="200"') == 1
    assert metric(text, "cpmbee_generated_tokens_total") == 3
    assert set(client.get("/openapi.json").json()["paths"]) >= {"/v1/generate", "/v1/chat/completions"}


# ---------------------------------------------------------------------------------------------- batching
def test_concurrent_requests_share_one_batch(model, tiny_tokenizer):
    prompts = [{"input": w, "<ans>": ""} for w in ("the", "今天", "input", "北京")]
    options = {"beam_size": 1, "max_new_tokens": 5}
    alone = [generate(model, tiny_tokenizer, p, **options) for p in prompts]
    with serving(model, tiny_tokenizer, batch_wait_s=0.05) as client:
        gate = Gate(model)
        with ThreadPoolExecutor(len(prompts) + 1) as pool:
            blocker = pool.submit(client.post, "/v1/generate", json={"input": PROMPT, "options": options})
            assert gate.entered.wait(10)  # the worker is busy with the blocker; the rest queue up
            futures = [
                pool.submit(client.post, "/v1/generate", json={"input": p, "options": options})
                for p in prompts
            ]
            deadline = time.monotonic() + 10
            while client.engine.queue_depth < len(prompts) and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.open()
            outputs = [f.result().json()["output"] for f in futures]
            assert blocker.result().status_code == 200
        text = client.get("/metrics").text
    assert outputs == alone
    assert metric(text, "cpmbee_batch_rows_count") == 2  # the blocker, then one batch of four
    assert metric(text, "cpmbee_batch_rows_sum") == 1 + len(prompts)
    assert metric(text, "cpmbee_batch_requests_bucket", 'le="4.0"') == 2
    # one prefill and at most 5 steps for the batch of four instead of four times that
    assert metric(text, "cpmbee_forward_passes_total") <= 2 * (1 + 5)


def test_incompatible_options_are_not_batched(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, batch_wait_s=0.05) as client:
        gate = Gate(model)
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(
                client.post,
                "/v1/generate",
                json={"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 2}},
            )
            assert gate.entered.wait(10)
            a = pool.submit(
                client.post,
                "/v1/generate",
                json={"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 3}},
            )
            b = pool.submit(
                client.post,
                "/v1/generate",
                json={"input": PROMPT, "options": {"beam_size": 2, "max_new_tokens": 3}},
            )
            while client.engine.queue_depth < 2:
                time.sleep(0.01)
            gate.open()
            assert a.result().status_code == b.result().status_code == blocker.result().status_code == 200
        text = client.get("/metrics").text
    assert metric(text, "cpmbee_batch_requests_count") == 3 and metric(text, "cpmbee_batch_requests_sum") == 3


# ---------------------------------------------------------------------------------------------- back-pressure
def test_full_queue_gets_429_with_retry_after(model, tiny_tokenizer):
    body = {"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 2}}
    with serving(model, tiny_tokenizer, max_queue=1) as client:
        gate = Gate(model)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/generate", json=body)
            assert gate.entered.wait(10)
            queued = pool.submit(client.post, "/v1/generate", json=body)
            while client.engine.queue_depth < 1:
                time.sleep(0.01)
            refused = client.post("/v1/generate", json=body)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
            gate.open()
            assert running.result().status_code == queued.result().status_code == 200
        assert client.post("/v1/generate", json=body).status_code == 200  # and the server goes on
        text = client.get("/metrics").text
    assert metric(text, "cpmbee_request_errors_total", 'endpoint="/v1/generate",reason="queue_full"') == 1


def test_timeout_gets_504_and_stops_generation(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, request_timeout_s=0.5) as client:
        gate = Gate(model)
        timer = threading.Timer(1.0, gate.open)  # the worker is stuck well past the deadline
        timer.start()
        r = client.post(
            "/v1/generate", json={"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 200}}
        )
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        timer.join()
        deadline = time.monotonic() + 10
        while client.engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        text = client.get("/metrics").text
        # the abandoned row stopped at its next step instead of running its 200 tokens
        assert metric(text, "cpmbee_generated_tokens_total") <= 2
        ok = client.post(
            "/v1/generate", json={"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 2}}
        )
        assert ok.status_code == 200


def test_streaming_timeout_sends_an_error_event(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, request_timeout_s=0.5) as client:
        gate = Gate(model)
        timer = threading.Timer(1.0, gate.open)
        timer.start()
        r = client.post(
            "/v1/completions", json={"prompt": "the", "max_tokens": 50, "temperature": 0, "stream": True}
        )
        timer.join()
    assert r.status_code == 200
    event, data = parse_sse(r.text)[-1]
    assert event == "error" and data["error"]["code"] == 504


# ---------------------------------------------------------------------------------------------- auth & limits
def test_api_key(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, api_key="s3cret") as client:
        body = {"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 2}}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = client.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        assert (
            client.post("/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/generate", {"input": PROMPT, "options": {"max_new_tokens": 65}}, "options.max_new_tokens"),
        ("/v1/generate", {"input": PROMPT, "options": {"max_new_tokens": 0}}, "options.max_new_tokens"),
        ("/v1/generate", {"input": PROMPT, "options": {"beam_size": 9}}, "options.beam_size"),
        ("/v1/generate", {"input": PROMPT, "options": {"beam_sizes": 2}}, "options.beam_sizes"),
        ("/v1/generate", {"input": PROMPT, "options": {"do_sample": True}}, "options"),
        ("/v1/generate", {"input": PROMPT, "extra": 1}, "extra"),
        ("/v1/generate", {"input": {"input": "x"}}, "input"),
        ("/v1/generate", {"input": [PROMPT, {"input": "x"}]}, "input.1"),
        ("/v1/generate", {"input": [PROMPT] * 5}, "input"),
        ("/v1/generate", {"input": {"input": "x" * 300, "<ans>": ""}}, "input"),
        ("/v1/generate", {"input": {"a": {"b": 1}, "<ans>": ""}}, "input"),
        ("/v1/generate", {"input": []}, "input"),
        ("/v1/generate", {"options": {}}, "input"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
        ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
        ("/v1/completions", {"prompt": "x", "beam_size": 2}, "beam_size"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, "presence_penalty"),
        ("/v1/completions", {"prompt": [1, 2]}, "prompt.str"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages.1.role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(model, tiny_tokenizer, path, body, param):
    limits = Limits(max_new_tokens=64, max_rows=4, max_input_tokens=100)
    with serving(model, tiny_tokenizer, limits=limits) as client:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    assert param.split(".")[0] in r.json()["error"]["message"]


def test_body_size_and_malformed_bodies(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, limits=Limits(max_body_bytes=2000)) as client:
        big = {"input": {"input": "x" * 3000, "<ans>": ""}}
        r = client.post("/v1/generate", json=big)
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"

        def chunks():
            yield b'{"input": {"input": "'
            yield b"x" * 3000
            yield b'", "<ans>": ""}}'

        assert client.post("/v1/generate", content=chunks()).status_code == 413  # no Content-Length
        r = client.post("/v1/generate", content=b'{"input": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "body"
        assert "invalid JSON" in r.json()["error"]["message"]
        assert (
            client.post(
                "/v1/generate", content=b"[1, 2]", headers={"Content-Type": "application/json"}
            ).status_code
            == 422
        )
        assert client.get("/v1/generate").status_code == 405
        assert client.get("/nope").status_code == 404
        assert client.get("/health").status_code == 200
