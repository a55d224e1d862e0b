"""The live dashboard's HTTP API and its event stream (cpmbee.live.server)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("starlette", reason="SKIPPED: the live dashboard tests need the `live` extra (starlette)")
pytest.importorskip("httpx", reason="SKIPPED: Starlette's test client needs httpx")

import httpx
from starlette.testclient import TestClient

from cpmbee.live.server import bind_socket, create_app
from cpmbee.train.metrics import JsonlSink, MetricsLogger

from .live_helpers import DAY2, LiveServer, append_live_steps, build_run, write_status


@pytest.fixture
def run_dir(tmp_path):
    return build_run(tmp_path / "run", finished=False)


@pytest.fixture
def client(run_dir):
    with TestClient(create_app(run_dir, poll_interval=0.05)) as c:
        yield c


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in (
        "/static/app.js",
        "/static/app.css",
        "/static/vendor/uplot/uPlot.iife.min.js",
        "/static/vendor/uplot/uPlot.min.css",
    ):
        assert src in page.text
        assert client.get(src).status_code == 200, src
    assert "cdn" not in page.text.lower()  # everything is served locally


def test_snapshot(client, run_dir):
    snap = client.get("/api/snapshot?max_points=50").json()
    assert snap["run"]["name"] == "tiny-synthetic"
    assert snap["status"]["state"] == "running" and snap["status"]["age_s"] < 60
    assert snap["train"]["points"] == 150 and len(snap["train"]["step"]) <= 50
    assert snap["seq"] > 0 and snap["counts"]["train"] == 160
    assert [c["exists"] for c in snap["checkpoints"]][-2:] == [True, True]
    assert snap["utc_offset_hours"] == 16
    for bad in ("x", "5", "-1"):
        r = client.get(f"/api/snapshot?max_points={bad}")
        assert r.status_code == 400 and "max_points" in r.json()["error"]


def test_status_follows_the_file(client, run_dir):
    assert client.get("/api/status").json()["status"]["state"] == "running"
    write_status(run_dir, "crashed", 150)
    deadline = time.monotonic() + 5
    while client.get("/api/status").json()["status"]["state"] != "crashed":
        assert time.monotonic() < deadline, "status change not picked up"
        time.sleep(0.05)


def test_inspect(client):
    data = client.get("/api/inspect", params={"stat": "grad_norm", "groups": "layers", "limit": 1}).json()
    assert data["stat"] == "grad_norm" and data["matched"] == 2 and len(data["groups"]) == 1
    assert len(data["step"]) == 15 and data["series"][data["groups"][0]][-1] == pytest.approx(0.1 / 150)
    assert client.get("/api/inspect", params={"stat": "bogus"}).status_code == 400
    r = client.get("/api/inspect", params={"stat": "norm", "groups": "(["})
    assert r.status_code == 400 and r.json()["error"].startswith("groups")
    assert client.get("/api/inspect", params={"stat": "norm", "limit": "0"}).status_code == 400


def test_incident_files(client):
    r = client.get("/api/incidents/step-00000075-loss_spike.json")
    assert r.status_code == 200 and r.json()["samples"][0]["<ans>"] == "<script>x</script>"
    assert client.get("/api/incidents/step-00000001-nan.json").status_code == 404
    assert client.get("/api/incidents/..%2Frun.json").status_code in (400, 404)
    assert client.get("/api/incidents/.secret.json").status_code == 400


def test_reports(client, run_dir):
    days = client.get("/api/reports").json()
    assert [d["day"] for d in days["days"]] == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert not any(d["markdown"] for d in days["days"]) and days["utc_offset_hours"] == 16
    page = client.get(f"/reports/{DAY2}")
    assert page.status_code == 200 and "<h2>Average Grad Norm</h2>" in page.text
    md = client.get(f"/reports/{DAY2}?format=md")
    assert md.text.startswith("# Training log") and "markdown" in md.headers["content-type"]
    assert not (run_dir / "reports").exists()  # viewing writes nothing
    r = client.post(f"/api/reports/{DAY2}")
    assert r.status_code == 200 and r.json()["written"] == [
        f"reports/daily-{DAY2}.md",
        f"reports/daily-{DAY2}.html",
    ]
    assert client.get("/api/reports").json()["days"][1]["markdown"] is True
    assert client.get("/reports/2024-13-40").status_code == 400
    assert client.get("/reports/2024-06-01").status_code == 404
    assert client.post("/api/reports/2024-06-01").status_code == 404
    assert client.get(f"/reports/{DAY2}?format=pdf").status_code == 400


def test_host_header_is_checked_when_asked(run_dir):
    app = create_app(run_dir, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/status").status_code == 200
        assert c.get("/api/status", headers={"host": "evil.example:8765"}).status_code == 400


def test_bad_run_dir(tmp_path):
    with pytest.raises(ValueError, match="run_dir"):
        create_app(tmp_path / "missing")
    with pytest.raises(ValueError, match="poll_interval"):
        create_app(tmp_path, poll_interval=0)


def _events(lines, until):
    """Parse SSE lines into (event, data) pairs until ``until(event, data)`` is true."""
    event, data, seen = None, [], []
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and event:
            payload = json.loads("\n".join(data))
            seen.append((event, payload))
            if until(event, payload):
                return seen
            event, data = None, []
    raise AssertionError(f"stream ended; got {[e for e, _ in seen]}")


def test_stream_pushes_appended_records(run_dir):
    with (
        LiveServer(run_dir, poll_interval=0.05) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        seq = http.get("/api/snapshot").json()["seq"]
        with http.stream("GET", f"/api/stream?after={seq}") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            first = _events(lines, lambda e, d: e == "status")
            assert first[-1][1]["status"]["state"] == "running"
            append_live_steps(run_dir, 151, 3)
            seen = _events(lines, lambda e, d: e == "records" and d["records"][-1].get("step") == 153)
            steps = [
                r["step"] for e, d in seen if e == "records" for r in d["records"] if r["type"] == "train"
            ]
            assert steps == [151, 152, 153]
            records = [r for e, d in seen if e == "records" for r in d["records"]]
            assert [r["seq"] for r in records] == list(range(seq + 1, seq + 1 + len(records)))
        # reconnecting with an older position replays what was missed
        with http.stream("GET", f"/api/stream?after={seq + 1}") as stream:
            seen = _events(stream.iter_lines(), lambda e, d: e == "records")
            assert [r["step"] for r in seen[-1][1]["records"]] == [152, 153]
        # an incident with NaN fields arrives as valid JSON (null)
        with http.stream("GET", f"/api/stream?after={seq + 3}") as stream:
            lines = stream.iter_lines()
            _events(lines, lambda e, d: e == "status")
            with MetricsLogger([JsonlSink(run_dir / "metrics", utc_offset_hours=16)]) as logger:
                logger.log(
                    "incident", 154, kind="nan", message="non-finite loss", detail={"loss": float("nan")}
                )
            seen = _events(lines, lambda e, d: e == "records")
            assert seen[-1][1]["records"][0]["detail"] == {"loss": None}


def test_bind_socket_finds_a_free_port():
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="port"):
            bind_socket("127.0.0.1", port)
        other = bind_socket("127.0.0.1", port, search=10)
        assert other.getsockname()[1] != port
        other.close()
    finally:
        taken.close()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_cli_serves_and_stops_on_a_signal(run_dir, stop):
    """`cpmbee live RUN_DIR --port 0` as a user runs it: prints its URL, serves, and exits cleanly on Ctrl-C
    or on the SIGTERM of `timeout`/systemd/Kubernetes (#13.3: a user's regex once kept it from stopping)."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "cpmbee", "live", str(run_dir), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line
        with httpx.Client(base_url=match.group(1), timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = http.get("/api/status").json()
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "server did not answer"
                    time.sleep(0.2)
            assert status["run"]["name"] == "tiny-synthetic"
            assert http.get("/api/inspect", params={"groups": "(.*.*)*="}).status_code in (200, 400)
            # an open event stream does not keep the server from stopping
            with http.stream("GET", "/api/stream") as stream:
                next(stream.iter_lines())
                proc.send_signal(getattr(signal, stop))
                assert proc.wait(timeout=15) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_a_missing_run_dir(tmp_path):
    from click.testing import CliRunner

    from cpmbee.__main__ import cli

    out = CliRunner().invoke(cli, ["live", str(tmp_path / "nope")])
    assert out.exit_code != 0 and "does not exist" in out.output
