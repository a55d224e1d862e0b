"""The server under fuzzing (issue #13): whatever a client sends, the answer is never a 5xx, a complete
request is always answered, the generation worker stays alive and every case takes bounded time.

One real uvicorn server (configured as ``cpmbee serve`` configures it) on a tiny random model serves every
case; after each one the worker must still be alive. Cases: the OpenAPI schema (schemathesis), unicode edge
cases (lone surrogates, NUL, control tokens, ...) in every place a string goes, numeric extremes for every
option, dict fan-out/depth/length extremes, and malformed HTTP over raw sockets. ``slow`` runs a heavier
schema fuzz.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server tests need the `serve` extra")
httpx = pytest.importorskip("httpx")

from cpmbee.serve import Engine, Limits, create_app  # noqa: E402

from .serve_helpers import http_status, live_server, parse_sse, raw_http, tiny_model  # noqa: E402

CASE_SECONDS = 20.0  # the most any one case may take (a tiny model, at most 4 new tokens)
LIMITS = Limits(max_new_tokens=4, max_rows=4, max_input_tokens=256, body_timeout_s=2.0)


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    """(base URL, engine) of one server for the whole module."""
    engine = Engine(tiny_model(tiny_tokenizer), tiny_tokenizer, batch_wait_s=0)
    app = create_app(engine, limits=LIMITS, request_timeout_s=CASE_SECONDS)
    with live_server(app, header_timeout_s=1.0) as url:
        yield url, engine


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=CASE_SECONDS) as client:
        yield client


def _check(server: tuple[str, Any], response: httpx.Response, started: float, case: Any) -> None:
    """No 5xx, a well-formed body, bounded time, and a worker still alive."""
    assert response.status_code < 500, (case, response.status_code, response.text[:300])
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = parse_sse(response.content.decode("utf-8"))  # complete: the stream was not cut
        assert events[-1][0] in ("end", "error") or events[-1][1] == "[DONE]", (case, events[-3:])
    elif response.content:
        json.loads(response.content)
    assert time.monotonic() - started < CASE_SECONDS, case
    assert server[1].alive, f"the worker died after {case!r}"


def _send(server, http, path: str, body: Any, stream: bool = False) -> None:
    payload = json.dumps(body).encode()  # Python's encoder: surrogates as escapes, NaN/Infinity literals
    started = time.monotonic()
    if stream:
        with http.stream("POST", path, content=payload) as r:
            r.read()
    else:
        r = http.post(path, content=payload)
    _check(server, r, started, (path, body if len(payload) < 300 else f"{len(payload)} bytes"))


# ---------------------------------------------------------------------------------------------- strings
STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\udc00",
    "\ud800",
    "x\udbff\udfffy",  # a valid pair: one character
    "\U0010ffff",
    "😀",
    "<",
    "<<",
    "a < b",
    "<mask_0>",
    "<ans>",
    "<ans_1>",
    "<unk>",
    "</s>",
    "<s>",
    "\r\n\t",
    "\u2028\u2029",
    "\ufeff",
    "\x1b[31m",
    "a" * 3000,
    "<" * 301,
]

NATIVE_PLACES = {
    "value": lambda s: {"input": {"input": s, "<ans>": ""}},
    "key": lambda s: {"input": {s: "x", "<ans>": ""}},
    "answer key": lambda s: {"input": {"input": "x", "<ans>": {s: ""}}},
    "nested": lambda s: {"input": {"a": {s: s}, "<ans>": ""}},
    "answer text": lambda s: {"input": {"input": "x", "<ans>": s}},
    "stop": lambda s: {"input": {"input": "x", "<ans>": ""}, "options": {"beam_size": 1, "stop": [s]}},
    "second row": lambda s: {"input": [{"input": "x", "<ans>": ""}, {"input": s, "<ans>": ""}]},
}
OPENAI_PLACES = {
    "prompt": ("/v1/completions", lambda s: {"prompt": s}),
    "prompts": ("/v1/completions", lambda s: {"prompt": ["x", s]}),
    "completion stop": ("/v1/completions", lambda s: {"prompt": "x", "stop": s}),
    "user": ("/v1/completions", lambda s: {"prompt": "x", "user": s, "model": s}),
    "content": ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": s}]}),
    "part": (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
    ),
    "system": (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "system", "content": s}, {"role": "user", "content": "x"}]},
    ),
    "name": ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": "x", "name": s}]}),
    "chat stop": (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "user", "content": "x"}], "stop": [s]},
    ),
    "metadata": (
        "/v1/chat/completions",
        lambda s: {"messages": [{"role": "user", "content": "x"}], "metadata": {s: s}},
    ),
}


@pytest.mark.parametrize("place", list(NATIVE_PLACES))
def test_unicode_edge_cases_in_native_inputs(server, http, place):
    for text in STRINGS:
        _send(server, http, "/v1/generate", NATIVE_PLACES[place](text))
    for text in ("\udc00", "\x00", "<mask_0>"):
        _send(server, http, "/v1/generate", {**NATIVE_PLACES[place](text), "stream": True}, stream=True)


@pytest.mark.parametrize("place", list(OPENAI_PLACES))
def test_unicode_edge_cases_in_openai_inputs(server, http, place):
    path, build = OPENAI_PLACES[place]
    for text in STRINGS:
        _send(server, http, path, {"max_tokens": 3, **build(text)})
    for text in ("\udc00", "<"):
        _send(server, http, path, {"max_tokens": 3, "stream": True, **build(text)}, stream=True)


# ---------------------------------------------------------------------------------------------- numbers
NUMBERS: list[Any] = [
    0,
    1,
    -1,
    3,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**40,
    0.5,
    -0.0,
    1e-300,
    5e-324,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    "3",
    None,
    [],
]
NATIVE_OPTIONS = [
    "beam_size",
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "repetition_window",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
]
OPENAI_FIELDS = [
    "temperature",
    "top_p",
    "n",
    "seed",
    "max_tokens",
    "top_k",
    "repetition_penalty",
    "min_tokens",
    "beam_size",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream_options",
]


@pytest.mark.parametrize("option", NATIVE_OPTIONS)
def test_numeric_extremes_of_every_native_option(server, http, option):
    sampling = {"beam_size": 1, "do_sample": True, "max_new_tokens": 3}
    for value in NUMBERS:
        for base in ({"max_new_tokens": 3}, sampling):
            body = {"input": {"input": "x", "<ans>": ""}, "options": {**base, option: value}}
            _send(server, http, "/v1/generate", body)


@pytest.mark.parametrize("field", OPENAI_FIELDS)
def test_numeric_extremes_of_every_openai_field(server, http, field):
    for value in NUMBERS:
        _send(server, http, "/v1/completions", {"prompt": "x", "max_tokens": 3, field: value})
        chat = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3, field: value}
        _send(server, http, "/v1/chat/completions", chat)


# ---------------------------------------------------------------------------------------------- shapes
def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


SHAPES: dict[str, Any] = {
    "20k keys": {"input": {**{f"k{i}": "v" for i in range(20_000)}, "<ans>": ""}},
    "100 keys": {"input": {**{f"k{i}": "v" for i in range(100)}, "<ans>": ""}},
    "300 answers": {"input": {"input": "x", "<ans>": {f"a{i}": "" for i in range(300)}}},
    "depth 7": {"input": {"a": _nested(6), "<ans>": ""}},
    "depth 9": {"input": {"a": _nested(8), "<ans>": ""}},
    "depth 900": {"input": {"a": _nested(900), "<ans>": ""}},
    "json depth 100k": None,  # sent raw below
    "long key": {"input": {"k" * 200_000: "v", "<ans>": ""}},
    "long value": {"input": {"input": "v" * 200_000, "<ans>": ""}},
    "empty": {"input": {}},
    "empty answer dict": {"input": {"input": "x", "<ans>": {}}},
    "only an answer": {"input": {"<ans>": ""}},
    "5 rows": {"input": [{"input": "x", "<ans>": ""}] * 5},
    "row not a dict": {"input": [{"input": "x", "<ans>": ""}, "x"]},
    "input number": {"input": 1},
    "input null": {"input": None},
    "input list of lists": {"input": [[{"<ans>": ""}]]},
    "body list": [],
    "body string": "x",
    "body null": None,
    "4 rows, n": {"prompt": ["a", "b"], "n": 2, "max_tokens": 2},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dict_fan_out_depth_and_length_extremes(server, http, shape):
    if shape == "json depth 100k":
        payload = b'{"input": ' + b'{"a": ' * 100_000 + b'"x"' + b"}" * 100_000 + b"}"
        started = time.monotonic()
        _check(server, http.post("/v1/generate", content=payload), started, shape)
        return
    path = "/v1/completions" if shape == "4 rows, n" else "/v1/generate"
    _send(server, http, path, SHAPES[shape])


# ---------------------------------------------------------------------------------------------- raw HTTP
GOOD = json.dumps({"input": {"input": "x", "<ans>": ""}, "options": {"max_new_tokens": 2}}).encode()


def _post(body: bytes, *headers: str, length: int | None = None, path: str = "/v1/generate") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


# name → (bytes to send, close the sending side after, statuses accepted; None = no answer is fine)
MALFORMED: dict[str, tuple[bytes, bool, set[int | None]]] = {
    "good": (_post(GOOD, length=len(GOOD)), False, {200}),
    "length not a number": (_post(GOOD, "Content-Length: abc"), False, {400}),
    "negative length": (_post(GOOD, "Content-Length: -1"), False, {400}),
    "huge length": (_post(GOOD, "Content-Length: 99999999999999999999"), False, {400, 413}),
    "two lengths": (_post(GOOD, "Content-Length: 5", f"Content-Length: {len(GOOD)}"), False, {400}),
    "truncated body": (_post(GOOD[:20], length=len(GOOD)), True, {None, 400}),
    "body stops": (_post(GOOD[:20], length=len(GOOD)), False, {408}),
    "extra bytes": (_post(GOOD + b"GARBAGE\r\n\r\n", length=len(GOOD)), False, {200}),
    "chunked": (_post(_chunked(GOOD[:10], GOOD[10:]), "Transfer-Encoding: chunked"), False, {200}),
    "bad chunk size": (_post(b"zz\r\nxx\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), True, {None, 400}),
    "length and chunked": (
        _post(_chunked(GOOD), "Transfer-Encoding: chunked", f"Content-Length: {len(GOOD)}"),
        True,
        {None, 200, 400},
    ),
    "no body": (_post(b"", length=0), False, {422}),
    "invalid json": (_post(b"{", length=1), False, {422}),
    "invalid utf-8": (_post(b'{"input": "\xff\xfe"}', length=15), False, {400, 422}),
    "bom": (_post(b"\xef\xbb\xbf" + GOOD, length=len(GOOD) + 3), False, {200, 400, 422}),
    "form type": (
        _post(GOOD, "Content-Type: application/x-www-form-urlencoded", length=len(GOOD)),
        False,
        {200},
    ),
    "xml type": (_post(GOOD, "Content-Type: application/xml", length=len(GOOD)), False, {415}),
    "http/1.0": (
        b"POST /v1/generate HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD),
        False,
        {200},
    ),
    "unknown method": (b"BREW /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, {405}),
    "get a post path": (b"GET /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, {405}),
    "dot dot path": (b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, {404}),
    "nul in path": (b"GET /v1/%00models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, {404}),
    "long path": (
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        True,
        {None, 400, 404, 431},
    ),
    "many headers": (
        _post(GOOD, *[f"X-{i}: {i}" for i in range(300)], length=len(GOOD)),
        False,
        {200, 400, 431},
    ),
    "no host": (b"GET /health HTTP/1.1\r\n\r\n", False, {200, 400}),
    "slow headers": (b"POST /v1/generate HTTP/1.1\r\nHost: 12", False, {None}),
    "tls hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, True, {None, 400}),
    "pipelined": (_post(GOOD, length=len(GOOD)) * 2, False, {200}),
    "expect continue": (_post(GOOD, "Expect: 100-continue", length=len(GOOD)), False, {100, 200}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http(server, name):
    url, engine = server
    data, close, accepted = MALFORMED[name]
    started = time.monotonic()
    status = http_status(raw_http(url, data, timeout=8, then_close=close))
    assert status in accepted, (name, status)
    assert time.monotonic() - started < 8
    assert engine.alive
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # and it goes on serving


# ---------------------------------------------------------------------------------------------- schema
def _schema_fuzz(server, examples: int) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    url, engine = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(
            max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=op.as_strategy())
        def check(case):
            started = time.monotonic()
            response = case.call(timeout=CASE_SECONDS)
            if response.status_code >= 500 or not engine.alive or time.monotonic() - started > CASE_SECONDS:
                failures.append(
                    (case.method, case.path, case.body, response.status_code, response.text[:200])
                )

        check()
    assert not failures, failures[:3]


def test_schema_fuzz_never_answers_5xx(server):
    _schema_fuzz(server, examples=25)


@pytest.mark.slow
def test_schema_fuzz_many_examples(server):
    _schema_fuzz(server, examples=300)
