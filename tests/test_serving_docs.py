"""Every curl command of the serving and dashboard docs (README.md, docs/serving.md, docs/live.md) runs as
written against a real server (only the port is changed), and gets a successful answer (#14.1: the
documented commands sent JSON that the server refused)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server tests need the `serve` extra")
pytest.importorskip("starlette", reason="the dashboard needs the `live` extra")
if shutil.which("curl") is None:
    pytest.skip("SKIPPED: the doc-command tests run curl, which is not installed", allow_module_level=True)

from cpmbee.serve import create_app, load_engine
from cpmbee.web import allowed_hosts_for

from .live_helpers import LiveServer, build_run
from .serve_helpers import live_server, parse_sse

ROOT = Path(__file__).resolve().parent.parent


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of a Markdown text (lines joined across ``\\`` and open quotes)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        current = ""
        for line in block.splitlines():
            current += line + "\n"
            if current.count("'") % 2 == 0 and not line.rstrip().endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def curl_commands(*docs: str) -> list[str]:
    found = [c for doc in docs for c in shell_commands((ROOT / doc).read_text()) if c.startswith("curl ")]
    assert found, docs
    return found


def _run(command: str, port: int, url_port: str) -> subprocess.CompletedProcess:
    command = command.replace(f":{url_port}", f":{port}")
    streaming = "/api/stream" in command  # the dashboard's stream runs until the user leaves
    try:
        return subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=5 if streaming else 120
        )
    except subprocess.TimeoutExpired as err:
        if not streaming:
            raise
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(command, 0, out, "")


def test_the_serving_docs_curl_commands_work_as_written():
    engine, info = load_engine(None)  # what `cpmbee serve` runs without --model
    app = create_app(engine, model_info=info, allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for command in curl_commands("README.md", "docs/serving.md"):
            result = _run(command, port, "8000")
            assert result.returncode == 0, (command, result.stderr)
            out = result.stdout
            if out.startswith("data:") or "\nevent:" in out:
                events = parse_sse(out)
                assert all(e != "error" for e, _ in events), (command, out[-300:])
                assert events[-1][0] == "end" or events[-1][1] == "[DONE]", (command, out[-300:])
            else:
                body = json.loads(out)
                assert "error" not in body, (command, body)


def test_the_dashboard_docs_curl_commands_work_as_written(tmp_path):
    run_dir = build_run(tmp_path / "run", finished=False)
    with LiveServer(run_dir) as server:
        port = int(server.url.rsplit(":", 1)[1])
        outputs = {}
        for command in curl_commands("docs/live.md"):
            result = _run(command, port, "8765")
            assert result.returncode == 0, (command, result.stderr)
            outputs[command] = result.stdout
    for command, out in outputs.items():
        if "/api/stream" in command:
            assert "event: status" in out, out[:300]
        else:
            body = json.loads(out)
            assert "error" not in body, (command, body)
            if "groups=" in command:
                assert body["groups"], "the documented pattern matches no parameter group"
