"""The live dashboard's hardening (issue #13 items 3, 4 and 9): user regexes cannot freeze it, text that is
not valid Unicode cannot break its answers, other web sites cannot make it write files; and a fuzz of every
endpoint (no 5xx, bounded time, still serving afterwards). Stopping on SIGTERM: test_live_server.py."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="SKIPPED: the live dashboard tests need the `live` extra (starlette)")
httpx = pytest.importorskip("httpx", reason="SKIPPED: the dashboard tests need httpx")

from cpmbee.live import server as live_server  # noqa: E402
from cpmbee.live.state import match_groups  # noqa: E402

from .live_helpers import DAY2, LiveServer, build_run  # noqa: E402
from .serve_helpers import http_status, raw_http  # noqa: E402

CATASTROPHIC = "(.*.*)*="  # exponential backtracking in Python's re on every parameter name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("live") / "run", finished=False)


@pytest.fixture(scope="module")
def server(run_dir):
    with LiveServer(run_dir, poll_interval=0.05, header_timeout_s=1.0) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def _serving(http) -> None:
    assert http.get("/api/status").status_code == 200


# ---------------------------------------------------------------------------------------------- item 3
def test_a_backtracking_pattern_does_not_freeze_the_dashboard(http):
    """#13.3: `groups=(.*.*)*%3D` blocked the event loop: no endpoint answered and SIGTERM was ignored."""
    started = time.monotonic()
    r = http.get("/api/inspect", params={"stat": "norm", "groups": CATASTROPHIC})
    assert r.status_code in (200, 400), r.text
    assert time.monotonic() - started < 5
    _serving(http)


def test_patterns_are_time_bounded_and_checked():
    names = [f"encoder.layers.{i}.self_att.project_q.weight" for i in range(50)]
    assert match_groups(r"layers\.1\d\.", names) == names[10:20]
    assert match_groups(None, names) == names and match_groups("", names) == names
    with pytest.raises(ValueError, match="takes longer than"):
        match_groups("layers", names, timeout_s=0.0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        match_groups("([", names)
    with pytest.raises(ValueError, match="at most 500 characters"):
        match_groups("a" * 501, names)


def test_matching_runs_off_the_event_loop(server, http, monkeypatch):
    """While a pattern is being matched, every other endpoint still answers at once."""
    slow_started = threading.Event()

    def slow(pattern, names):
        slow_started.set()
        time.sleep(1.5)
        return list(names)

    monkeypatch.setattr(live_server, "match_groups", slow)
    with httpx.Client(base_url=server.url, timeout=10) as other:
        worker = threading.Thread(target=lambda: other.get("/api/inspect", params={"groups": "x"}))
        worker.start()
        assert slow_started.wait(5)
        started = time.monotonic()
        _serving(http)
        assert time.monotonic() - started < 1.0, "the event loop waited for the pattern"
        worker.join(10)


# ---------------------------------------------------------------------------------------------- item 4
def test_text_that_is_not_unicode_is_escaped_not_a_500(tmp_path):
    """#13.4: a lone surrogate (a JSON escape in a record) made the JSON answers fail with a 500."""
    run_dir = build_run(tmp_path / "run", finished=False)
    metrics = sorted((run_dir / "metrics").glob("*.jsonl"))[-1]
    record = {
        "type": "incident",
        "step": 150,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(),
        "kind": "loss_spike",
        "message": "odd \udc00 text",
    }
    with LiveServer(run_dir, poll_interval=0.05) as s, httpx.Client(base_url=s.url, timeout=10) as http:
        seq = http.get("/api/snapshot").json()["seq"]
        with http.stream("GET", f"/api/stream?after={seq}") as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("event: status"):
                    break
            with open(metrics, "a", encoding="ascii") as f:  # as a job appends it, while the page listens
                f.write(json.dumps(record) + "\n")  # ensure_ascii: the surrogate as the escape \udc00
            for line in lines:
                if line.startswith("data: ") and "records" in line:
                    pushed = json.loads(line[len("data: ") :])["records"]
                    break
            else:
                raise AssertionError("the stream was cut")
        assert pushed[-1]["message"] == "odd \udc00 text"
        r = http.get("/api/snapshot")
        assert r.status_code == 200
        assert "odd \udc00 text" in [i.get("message") for i in json.loads(r.content)["incidents"]]


# ---------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}],
)
def test_other_sites_cannot_rewrite_reports(tmp_path, headers):
    """#13.9: a web page elsewhere could POST to /api/reports/DAY and rewrite report files."""
    run_dir = build_run(tmp_path / "run", finished=False)
    with LiveServer(run_dir) as s, httpx.Client(base_url=s.url, timeout=10) as http:
        r = http.post(f"/api/reports/{DAY2}", headers=headers)
        assert r.status_code == 403 and "refused" in r.json()["error"]
        assert not (run_dir / "reports").exists()
        same = {"Origin": s.url, "Sec-Fetch-Site": "same-origin"}  # the dashboard's own page
        assert http.post(f"/api/reports/{DAY2}", headers=same).status_code == 200
        assert http.post(f"/api/reports/{DAY2}").status_code == 200  # curl, scripts


# ---------------------------------------------------------------------------------------------- fuzz
ODD = [
    "",
    "%00",
    "%ED%B0%80",  # a UTF-8-encoded surrogate
    "%FF%FE",
    "((((",
    CATASTROPHIC,
    "(a%7Caa)*c",
    "-1",
    "0",
    "1e9",
    "9" * 40,
    "NaN",
    "%3Cscript%3E",
    "..%2F..%2Frun.json",
    "a" * 3000,
    "%E2%80%A8",
]
QUERIES = [
    "/api/snapshot?max_points={}",
    "/api/inspect?stat={}",
    "/api/inspect?stat=norm&groups={}",
    "/api/inspect?stat=norm&limit={}",
    "/api/inspect?stat=norm&max_points={}",
    "/api/incidents/{}",
    "/api/incidents/{}.json",
    "/reports/{}",
    "/reports/" + DAY2 + "?format={}",
    "/api/status?x={}",
    "/static/{}",
]


@pytest.mark.parametrize("query", QUERIES)
def test_every_endpoint_under_odd_parameters(server, http, query):
    for value in ODD:
        started = time.monotonic()
        r = http.get(query.format(value))
        assert r.status_code < 500, (query, value, r.status_code, r.text[:200])
        assert time.monotonic() - started < 5, (query, value)
    _serving(http)


def test_report_writing_under_odd_days(server, http, run_dir):
    for value in ODD:
        r = http.post(f"/api/reports/{value}")
        assert 300 <= r.status_code < 500, (value, r.status_code)
    assert not (Path(run_dir) / "reports").exists()  # nothing written for days that are not days


def test_the_stream_under_odd_positions(server, http):
    for value in ("-1", "x", "9" * 40, "%00", "0", "99999999"):
        with http.stream("GET", f"/api/stream?after={value}") as r:
            assert r.status_code < 500
            if r.status_code == 200:
                next(r.iter_lines())
    _serving(http)


@pytest.mark.parametrize(
    ("data", "accepted"),
    [
        (b"GET /api/status HTTP/1.1\r\nHost: 127.0", {None}),  # slow headers: cut off
        (b"POST /api/reports/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", {400}),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {None, 400, 404, 431}),
        (b"BREW /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", {405}),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, {None, 400}),
        (b"GET /api/status HTTP/1.1\r\nHost: evil.example\r\n\r\n", {200}),  # any host when not told
    ],
)
def test_malformed_http_to_the_dashboard(server, http, data, accepted):
    started = time.monotonic()
    assert http_status(raw_http(server.url, data, timeout=8)) in accepted
    assert time.monotonic() - started < 8
    _serving(http)
