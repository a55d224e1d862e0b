"""The server under a real uvicorn on loopback (client disconnects), loading with ``--memory-limit`` (disk
offload gives the same answers) and the ``cpmbee serve`` command. The fuzzing is in test_serve_fuzz.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server tests need the `serve` extra")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402

from cpmbee.__main__ import cli  # noqa: E402
from cpmbee.generation import generate  # noqa: E402
from cpmbee.serve import Engine, Limits, create_app, load_engine  # noqa: E402

from .serve_helpers import Gate, live_server, metric, tiny_model  # noqa: E402

PROMPT = {"input": "今天天气不错", "<ans>": ""}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer)


def _slow_down(model, seconds: float):
    return model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_stream_disconnect_cancels_generation(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    app = create_app(engine, limits=Limits(max_new_tokens=400))
    handle = _slow_down(model, 0.01)  # 400 tokens would take more than 4 s
    try:
        with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            body = {"prompt": "the", "max_tokens": 400, "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the stream has started; now leave
            assert _wait_until(lambda: engine.running == 0)
            text = client.get("/metrics").text
    finally:
        handle.remove()
    assert (
        metric(text, "cpmbee_request_errors_total", 'endpoint="/v1/completions",reason="client_disconnected"')
        == 1
    )
    assert metric(text, "cpmbee_generated_tokens_total") < 200


def test_non_streaming_disconnect_cancels_queued_and_running_work(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    app = create_app(engine, limits=Limits(max_new_tokens=400))
    gate = Gate(model)
    with live_server(app) as url:
        body = {"input": PROMPT, "options": {"beam_size": 1, "max_new_tokens": 400}}
        running = threading.Thread(target=lambda: _give_up(url, body, 0.5))
        running.start()
        assert gate.entered.wait(10)
        _give_up(url, body, 0.3)  # queued behind the first one, and gone before it runs
        running.join()
        assert _wait_until(lambda: engine.queue_depth == 0)
        time.sleep(0.5)  # both handlers noticed their clients left
        gate.open()
        assert _wait_until(lambda: engine.running == 0)
        with httpx.Client(base_url=url) as client:
            text = client.get("/metrics").text
    assert (
        metric(text, "cpmbee_request_errors_total", 'endpoint="/v1/generate",reason="client_disconnected"')
        == 2
    )
    assert metric(text, "cpmbee_batch_rows_count") == 1  # the queued request never ran
    assert metric(text, "cpmbee_generated_tokens_total") <= 2  # the running one stopped at once


def _give_up(url: str, body: dict, after_s: float) -> None:
    with httpx.Client(base_url=url, timeout=after_s) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json=body)


def test_memory_limit_disk_offload_gives_the_same_answers(model, tiny_tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    data = [PROMPT, {"input": "the question", "<ans>": {"a": "", "b": ""}}]
    expected = generate(model, tiny_tokenizer, data, beam_size=2, max_new_tokens=6)

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    engine, info = load_engine(
        tmp_path / "tiny",
        device="cpu",
        memory_limit=f"cpu={int(size * 0.7) // 1000}KB",
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in info["placement"] and "cpu" in info["placement"], info
    assert any((tmp_path / "offload").iterdir())
    assert generate(engine.model, engine.tokenizer, data, beam_size=2, max_new_tokens=6) == expected


def test_serve_command_help_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for option in (
        "--model",
        "--api-key",
        "--quantize",
        "--memory-limit",
        "--max-queue",
        "--request-timeout",
    ):
        assert option in result.output
    serve = ["serve", "--port", "0", "--model", str(tmp_path)]
    result = runner.invoke(cli, [*serve, "--memory-limit", "lots"])
    assert result.exit_code != 0 and "memory limit" in result.output
    result = runner.invoke(cli, [*serve, "--quantize", "int8", "--memory-limit", "1GiB"])
    assert result.exit_code != 0 and "cannot be combined" in result.output
    with socket.socket() as taken:  # a taken port is an error line at once, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli, ["serve", "--model", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
