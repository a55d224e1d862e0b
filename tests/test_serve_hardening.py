"""Regression tests of the server's hardening (issue #13 items 1-9, and #14 items 1, 4, 7, 10 on the server
side): each reproduces a reported failure. The broad fuzzing is in test_serve_fuzz.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server tests need the `serve` extra")
httpx = pytest.importorskip("httpx")

from cpmbee.generation import GenerationOptions, generate  # noqa: E402
from cpmbee.prompt import PromptTooLong, encode_prompt, segment_relations  # noqa: E402
from cpmbee.serve import Engine, Limits, create_app  # noqa: E402
from cpmbee.serve import engine as engine_module  # noqa: E402
from cpmbee.serve.openai import LiteralStream, conversation_to_cpmbee  # noqa: E402
from cpmbee.serve.protocol import ChatMessage  # noqa: E402
from cpmbee.serve.server import WorkerDied, run_server  # noqa: E402
from cpmbee.web import allowed_hosts_for  # noqa: E402

from .serve_helpers import (  # noqa: E402
    Gate,
    free_port,
    http_status,
    live_server,
    metric,
    parse_sse,
    post_json,
    raw_http,
    serving,
    tiny_model,
)

PROMPT = {"input": "今天天气不错", "<ans>": ""}
GREEDY = {"beam_size": 1, "max_new_tokens": 3}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer)


@pytest.fixture
def client(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, request_timeout_s=10) as c:
        yield c


def _still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/generate", json={"input": PROMPT, "options": GREEDY})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stop": "\udc00"}),
        ("/v1/completions", {"prompt": "the", "max_tokens": 3, "temperature": 0, "stop": ["\udc00"]}),
        ("/v1/generate", {"input": PROMPT, "options": {**GREEDY, "stop": ["\udc00"]}}),
    ],
)
def test_a_lone_surrogate_stop_string_leaves_the_worker_alive(client, path, body):
    """#13.1: the batch key was the options' JSON, which cannot encode a lone surrogate: the worker died."""
    r = post_json(client, path, body)
    assert r.status_code == 200, r.text
    _still_serving(client)


def test_a_failing_job_fails_alone(model, tiny_tokenizer, monkeypatch):
    """A job that raises inside generation gets its own error; the jobs batched with it are answered."""
    real = engine_module.stream_generate

    def poisoned(model, tokenizer, rows, options, **kwargs):
        if any(row.get("input") == "poison" for row in rows):
            raise RuntimeError("poisoned input")
        return real(model, tokenizer, rows, options, **kwargs)

    monkeypatch.setattr(engine_module, "stream_generate", poisoned)
    good = {"input": "the", "<ans>": ""}
    with serving(model, tiny_tokenizer, batch_wait_s=0.05, request_timeout_s=20) as client:
        gate = Gate(model)
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(client.post, "/v1/generate", json={"input": PROMPT, "options": GREEDY})
            assert gate.entered.wait(10)
            bad = pool.submit(
                client.post, "/v1/generate", json={"input": {**good, "input": "poison"}, "options": GREEDY}
            )
            fine = pool.submit(client.post, "/v1/generate", json={"input": good, "options": GREEDY})
            while client.engine.queue_depth < 2:
                time.sleep(0.01)
            gate.open()
            assert blocker.result().status_code == 200
            assert bad.result().status_code == 500 and "poisoned" in bad.result().json()["error"]["message"]
            assert fine.result().status_code == 200
            assert fine.result().json()["output"] == generate(model, tiny_tokenizer, good, **GREEDY)
        _still_serving(client)


def test_a_dead_worker_fails_health_and_stops_the_server(model, tiny_tokenizer, monkeypatch):
    """#13.1: if the worker dies anyway, /health says so and run_server ends with WorkerDied (non-zero exit)."""
    engine = Engine(model, tiny_tokenizer)

    def broken(batch):
        raise SystemExit("worker bug")  # not an Exception: escapes the per-batch handling

    monkeypatch.setattr(engine, "_serve", broken)
    app = create_app(engine, request_timeout_s=10)
    port = free_port()
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            run_server(app, port=port, log_level="critical")
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert http.get("/health").status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        r = http.post("/v1/generate", json={"input": PROMPT, "options": GREEDY})
        assert r.status_code == 500  # the job that was running when the worker died
        assert not engine.alive and engine.failure is not None
    thread.join(15)
    assert not thread.is_alive(), "the server kept running without its worker"
    assert isinstance(outcome[0], WorkerDied)


def test_the_serve_command_exits_non_zero_when_the_worker_dies(monkeypatch):
    from click.testing import CliRunner

    from cpmbee.__main__ import cli

    def broken(self, batch):
        raise SystemExit("worker bug")

    monkeypatch.setattr(Engine, "_serve", broken)
    port = free_port()

    def poke() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"input": PROMPT}, timeout=5)
                return
            except httpx.TransportError:
                time.sleep(0.1)

    poker = threading.Thread(target=poke, daemon=True)
    poker.start()
    result = CliRunner().invoke(cli, ["serve", "--port", str(port), "--log-level", "critical"])
    poker.join(10)
    assert result.exit_code == 1, result.output
    assert "generation worker died" in result.output


# ---------------------------------------------------------------------------------------------- item 2
def _reference_relations(parents, depths, max_depth):
    """The relation buckets by walking up the tree (the definition, slowly)."""
    n = len(parents)

    def chain(i):
        out = []
        while i >= 0:
            out.append(i)
            i = parents[i]
        return out[::-1]

    table = np.zeros((n, n), dtype=np.int32)
    for a in range(n):
        for b in range(n):
            ca, cb = chain(a), chain(b)
            common = sum(1 for x, y in zip(ca, cb) if x == y)
            up = min(depths[a] - (common - 1), max_depth - 1)
            down = min(depths[b] - (common - 1), max_depth - 1)
            bucket = up * max_depth + down
            table[a, b] = bucket + 1 if bucket else 0
    return table.reshape(-1)


def test_segment_relations_match_their_definition():
    rng = np.random.default_rng(0)
    for n in [1, 2, 5, 40, 70, 90]:  # 70 and 90 are above the memoized size
        parents, depths = [-1], [0]
        for i in range(1, n):
            p = int(rng.integers(0, i))
            parents.append(p)
            depths.append(depths[p] + 1)
        for max_depth in (2, 8, 16):
            got = segment_relations(parents, depths, max_depth)
            assert got.dtype == np.int32 and not got.flags.writeable
            assert np.array_equal(got, _reference_relations(parents, depths, max_depth)), (n, max_depth)


def test_oversized_prompts_are_refused_before_the_quadratic_work(tiny_tokenizer):
    """#13.2: 16,000 top-level keys took minutes (and would need a 32001² table); now refused at once."""
    wide = {**{f"k{i}": "v" for i in range(16_000)}, "<ans>": ""}
    started = time.monotonic()
    with pytest.raises(PromptTooLong, match="more than 2048 tokens") as err:
        encode_prompt(tiny_tokenizer, wide, max_tokens=2048)
    assert err.value.limit == 2048 and isinstance(err.value, ValueError)
    assert time.monotonic() - started < 10  # unbounded before (the table alone is 4 GB)
    # the limit is the prompt's length exactly: answer slots and in-context samples accounted for
    data = {"input": "hello", "<ans>": {"a": "", "b": ""}}
    n = len(encode_prompt(tiny_tokenizer, data))
    assert len(encode_prompt(tiny_tokenizer, data, max_tokens=n)) == n
    with pytest.raises(PromptTooLong):
        encode_prompt(tiny_tokenizer, data, max_tokens=n - 1)
    sample = {"input": "x", "<ans>": "y"}
    m = len(encode_prompt(tiny_tokenizer, data, samples=[sample]))
    assert len(encode_prompt(tiny_tokenizer, data, samples=[sample], max_tokens=m)) == m
    with pytest.raises(PromptTooLong, match=f"more than {m - 1} tokens"):
        encode_prompt(tiny_tokenizer, data, samples=[sample], max_tokens=m - 1)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/generate", {"input": {**{f"k{i}": "v" for i in range(16_000)}, "<ans>": ""}}, "input"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": r, "content": "hello"} for _ in range(2000) for r in ("user", "assistant")
                ]
            },
            "messages",
        ),
    ],
)
def test_the_server_refuses_oversized_prompts_quickly(client, path, body, param):
    if path.endswith("chat/completions"):
        body["messages"].append({"role": "user", "content": "and?"})
    started = time.monotonic()
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param and "limit of 2048 tokens" in r.json()["error"]["message"]
    assert time.monotonic() - started < 20  # 59 s for the chat, minutes for the keys, before
    _still_serving(client)


def test_encoding_counts_against_the_request_timeout(model, tiny_tokenizer):
    """Encoding runs off the event loop, inside the request's time limit."""
    wide = {**{f"k{i}": "v" for i in range(3000)}, "<ans>": ""}  # 6k segments: a 36M-entry table
    limits = Limits(max_input_tokens=10**6)
    with serving(model, tiny_tokenizer, limits=limits, request_timeout_s=0.05) as client:
        started = time.monotonic()
        r = client.post("/v1/generate", json={"input": wide})
        assert r.status_code == 504, r.text
        assert time.monotonic() - started < 5
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(
    "data",
    [
        {"input": "a\udc00b", "<ans>": ""},
        {"k\ud800": "x", "<ans>": ""},
        {"input": "x", "<ans>": {"\udfff": ""}},
    ],
    ids=["value", "key", "answer-key"],
)
def test_lone_surrogates_come_back_escaped(client, model, tiny_tokenizer, data):
    """#13.4: the response serializer failed (500), and a stream was cut."""
    expected = generate(model, tiny_tokenizer, data, **GREEDY)
    r = post_json(client, "/v1/generate", {"input": data, "options": GREEDY})
    assert r.status_code == 200, r.text
    assert json.loads(r.content) == {"output": expected}
    r = post_json(client, "/v1/generate", {"input": data, "options": GREEDY, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.content.decode("utf-8"))
    assert events[-1] == ("end", {"output": expected})
    _still_serving(client)


# ---------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/generate",
            {"input": PROMPT, "options": {"do_sample": True, "beam_size": 1, "seed": 2**64}},
            "options.seed",
        ),
        (
            "/v1/generate",
            {"input": PROMPT, "options": {"do_sample": True, "beam_size": 1, "seed": 1e25}},
            "options.seed",
        ),
        ("/v1/generate", {"input": PROMPT, "options": {"seed": -(2**63) - 1}}, "options.seed"),
        ("/v1/generate", {"input": PROMPT, "options": {"temperature": float("inf")}}, "options.temperature"),
        ("/v1/generate", {"input": PROMPT, "options": {"top_p": float("nan")}}, "options.top_p"),
        ("/v1/generate", {"input": PROMPT, "options": {"beam_size": "3"}}, "options.beam_size"),
        ("/v1/generate", {"input": PROMPT, "options": {"do_sample": 1}}, "options.do_sample"),
        ("/v1/generate", {"input": PROMPT, "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "x", "temperature": float("inf")}, "temperature"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "n": 1.0}, "n"),
    ],
)
def test_options_are_strict_and_finite(client, path, body, param):
    """#13.5: these validated, then crashed (500) or were coerced."""
    r = post_json(client, path, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e300}])
def test_sampling_at_extreme_settings_is_defined(client, model, tiny_tokenizer, extreme):
    """#13.5: temperature/top_p of 1e-300 gave inf/nan probabilities (500 / RuntimeError)."""
    options = {**GREEDY, "do_sample": True, "seed": 3, **extreme}
    r = client.post("/v1/generate", json={"input": PROMPT, "options": options})
    assert r.status_code == 200, r.text
    direct = generate(model, tiny_tokenizer, PROMPT, **options)
    assert r.json()["output"] == direct
    if extreme != {"temperature": 1e300}:  # a vanishing temperature or nucleus is greedy
        assert direct == generate(model, tiny_tokenizer, PROMPT, **GREEDY)


def test_the_python_api_raises_value_error_for_bad_options(model, tiny_tokenizer):
    for bad in ({"seed": 2**64}, {"temperature": float("inf")}, {"beam_size": "3"}, {"do_sample": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, tiny_tokenizer, PROMPT, **bad)
    opts = GenerationOptions.parse(beam_size=1, stop=("a",), temperature=1)  # sequences and ints still do
    assert opts.stop == ["a"] and opts.temperature == 1.0


# ---------------------------------------------------------------------------------------------- item 6
def test_an_aborted_upload_is_a_client_disconnect_not_a_500(model, tiny_tokenizer):
    app = create_app(Engine(model, tiny_tokenizer))
    with live_server(app) as url:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
        raw_http(url, head + b'{"input": ', timeout=2, then_close=True)
        time.sleep(0.5)
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "cpmbee_request_errors_total", 'endpoint="/v1/generate",reason="internal"') == 0
    assert (
        metric(text, "cpmbee_request_errors_total", 'endpoint="/v1/generate",reason="client_disconnected"')
        == 1
    )


# ---------------------------------------------------------------------------------------------- item 7
def test_authentication_comes_before_the_body(model, tiny_tokenizer):
    """#13.7: a client without the key could hold the server reading its (slow) upload."""
    app = create_app(Engine(model, tiny_tokenizer), api_key="k3y")
    with live_server(app) as url:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000\r\n\r\n"
        started = time.monotonic()
        response = raw_http(url, head + b"{", timeout=5)  # the rest of the body never comes
        assert http_status(response) == 401
        assert time.monotonic() - started < 4


def test_slow_bodies_time_out_and_bodies_in_flight_are_bounded(model, tiny_tokenizer):
    limits = Limits(body_timeout_s=0.5, max_body_bytes=4096, max_buffered_bytes=6000)
    app = create_app(Engine(model, tiny_tokenizer), limits=limits)
    head = b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4000\r\n\r\n"
    with live_server(app) as url, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        slow = pool.submit(raw_http, url, head + b"x" * 3500, timeout=5)
        time.sleep(0.2)  # the first upload holds 3500 of the 6000 bytes
        busy = raw_http(url, head + b"x" * 3500, timeout=5)
        assert http_status(busy) == 503 and b"Retry-After: 1" in busy.replace(b"retry-after", b"Retry-After")
        assert http_status(slow.result()) == 408
        assert time.monotonic() - started < 4
        ok = httpx.post(f"{url}/v1/generate", json={"input": PROMPT, "options": GREEDY}, timeout=10)
        assert ok.status_code == 200


def test_slow_request_headers_are_cut_off(model, tiny_tokenizer):
    app = create_app(Engine(model, tiny_tokenizer))
    with live_server(app, header_timeout_s=0.5) as url:
        started = time.monotonic()
        assert raw_http(url, b"POST /v1/generate HTTP/1.1\r\nHost: 127.0", timeout=10) == b""
        assert time.monotonic() - started < 5  # closed by the server, long before the client's 10 s
        assert httpx.get(f"{url}/health").status_code == 200


# ---------------------------------------------------------------------------------------------- item 8
def test_openai_text_is_literal(client, model, tiny_tokenizer):
    """#13.8: "is 1 < 2 ?" was a 422, and "<mask_0>" in a message a control token."""
    r = client.post("/v1/completions", json={"prompt": "is 1 < 2 ?", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    message = [ChatMessage(role="user", content="<mask_0> and 1<2")]
    data = conversation_to_cpmbee(message)
    assert data == {"input": "<<mask_0> and 1<<2", "<ans>": ""}
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "<mask_0>"}]}
    )
    assert r.status_code == 200
    expected = generate(model, tiny_tokenizer, {"input": "<<mask_0>", "<ans>": ""}, **GREEDY)["<ans>"]
    assert r.json()["choices"][0]["message"]["content"] == expected.replace("<<", "<")


def test_answers_come_back_literal_even_when_a_stream_cuts_an_escape():
    stream = LiteralStream()
    pieces = [stream.feed(t) for t in ("a<", "<b", "<<<", "<", "c")]
    assert "".join(pieces) + stream.flush() == "a<b<<c"


# ---------------------------------------------------------------------------------------------- item 9
def test_the_host_header_is_checked_on_a_loopback_server(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, allowed_hosts=allowed_hosts_for("127.0.0.1")) as client:
        assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "[::1]:8000"}).status_code == 200
        r = client.get("/health", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Host"
        r = client.post("/v1/generate", json={"input": PROMPT}, headers={"Host": "rebound.example"})
        assert r.status_code == 400


def test_an_api_key_guards_everything_but_health(model, tiny_tokenizer):
    with serving(model, tiny_tokenizer, api_key="s3cret") as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/metrics", "/nope"):
            assert client.get(path).status_code == 401, path
        assert client.get("/health").status_code == 200
        key = {"Authorization": "Bearer s3cret"}
        assert client.get("/openapi.json", headers=key).status_code == 200
        assert client.get("/docs", headers=key).status_code == 200
    with pytest.raises(ValueError, match="api_key"):
        create_app(Engine(model, tiny_tokenizer), api_key="")


def test_an_empty_api_key_is_an_error_on_the_command_line():
    from click.testing import CliRunner

    from cpmbee.__main__ import cli

    result = CliRunner().invoke(cli, ["serve", "--api-key", ""])
    assert result.exit_code == 2 and "--api-key" in result.output and "empty" in result.output


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}],
)
def test_cross_site_browser_posts_are_refused(client, headers):
    r = client.post("/v1/generate", json={"input": PROMPT, "options": GREEDY}, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["param"] == "Origin"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "http://testserver"},  # a browser without Sec-Fetch-Site
        {"Origin": "https://proxy.example", "Sec-Fetch-Site": "same-origin"},  # behind a reverse proxy
    ],
)
def test_same_origin_browser_posts_pass(client, headers):
    r = client.post("/v1/generate", json={"input": PROMPT, "options": GREEDY}, headers=headers)
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------- #14
def test_json_without_a_content_type_is_accepted(client):
    """#14.1: `curl -d` sends application/x-www-form-urlencoded; the documented commands got a 422."""
    body = json.dumps({"input": PROMPT, "options": GREEDY}).encode()
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain; charset=utf-8"):
        headers = {"Content-Type": content_type} if content_type else {}
        r = client.post("/v1/generate", content=body, headers=headers)
        assert r.status_code == 200, (content_type, r.text)
    r = client.post("/v1/generate", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 415
    assert r.json()["error"]["param"] == "Content-Type" and "application/json" in r.json()["error"]["message"]


def test_harmless_openai_fields_are_accepted(client):
    """#14.7: common clients send these; they change nothing."""
    extra = {"store": False, "metadata": {"k": "v"}, "parallel_tool_calls": True, "user": "u", "model": "m"}
    r = client.post("/v1/chat/completions", json={**CHAT, **extra, "service_tier": "auto"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    both = {**CHAT, "max_tokens": 5, "max_completion_tokens": 2}
    r = client.post("/v1/chat/completions", json=both)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2  # the newer name wins
    assert client.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"1": 2}}).status_code == 422
    assert client.post("/v1/responses", json={"input": "x"}).status_code == 404


def test_models_says_when_the_demo_model_answers(model, tiny_tokenizer):
    """#14.10"""
    info = {"demo": True, "parameters": 7_718_400}
    with serving(model, tiny_tokenizer, model_info=info) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["demo"] is True and "7.7M-parameter demo model" in card["description"]
    with serving(model, tiny_tokenizer, model_info={"parameters": 10**10}) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["demo"] is False and "description" not in card


def test_int8_on_cpu_logs_nothing_per_matmul(tiny_tokenizer, caplog):
    """#14.4: bitsandbytes logged a cast warning on every int8 matmul (12,810 lines after 30 requests)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:  # not imported here: cpmbee.quantize imports it
        pytest.skip("SKIPPED: needs bitsandbytes (the quant extra)")
    from cpmbee.quantize import quantize_model

    model = quantize_model(tiny_model(tiny_tokenizer), bits=8)
    with caplog.at_level(logging.DEBUG):
        generate(model, tiny_tokenizer, PROMPT, **GREEDY)
    noise = [r for r in caplog.records if r.name.startswith("bitsandbytes")]
    assert not noise, [r.getMessage() for r in noise[:3]]
