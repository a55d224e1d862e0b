"""``cpmbee finetune`` end to end on a tiny model: learning, LoRA, exact resume, early stop, evaluation, DDP."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cpmbee import CpmBeeForCausalLM
from cpmbee.checkpoint import load_model
from cpmbee.data.finetune import FinetuneCollator, prepare_for_finetune
from cpmbee.evaluation.likelihood import evaluate
from cpmbee.generation import allowed_output_columns
from cpmbee.objective import AnswerObjective
from cpmbee.train.finetune import FinetuneArgs, run_finetune
from cpmbee.train.metrics import read_records

from .conftest import REPO_ROOT, random_weights_, tiny_config

WORDS = ["the", "an", "in", "on", "is", "今天", "天气", "不错", "中国", "北京", "a", "b", "c", "d"]


def _choice_task(n: int, seed: int) -> list[dict]:
    """Pick the option equal to the input: learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        options = rng.sample(WORDS, 3)
        answer = rng.randrange(3)
        out.append(
            {
                "input": options[answer],
                "options": {f"<option_{i}>": w for i, w in enumerate(options)},
                "question": "is",
                "<ans>": f"<option_{answer}>",
            }
        )
    return out


def _keyed_task(n: int, seed: int) -> list[dict]:
    """The answer is a fixed function of the input word (options are distractors): learnable in minutes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        options = rng.sample(WORDS, 3)
        out.append(
            {
                "input": word,
                "options": {f"<option_{i}>": w for i, w in enumerate(options)},
                "question": "is",
                "<ans>": f"<option_{WORDS.index(word) % 3}>",
            }
        )
    return out


def _write(path: Path, samples: list[dict]) -> str:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_tokenizer, tiny_vocab_file):
    root = tmp_path_factory.mktemp("ft")
    config = tiny_config(tiny_tokenizer.vocab_size, hidden_size=48, dim_ff=96, num_hidden_layers=2)
    config.to_json_file(str(root / "config.json"))
    return {
        "config": str(root / "config.json"),
        "vocab": str(tiny_vocab_file),
        "train": _write(root / "train.jsonl", _choice_task(96, 0)),
        "eval": _write(root / "eval.jsonl", _choice_task(24, 1)),
        "progress": False,
        "batch_size": 8,
        "lr": 3e-2,
        "warmup_steps": 2,
    }


def _args(job: dict, out: Path, **overrides) -> FinetuneArgs:
    return FinetuneArgs(out=str(out), **{**job, **overrides})


def _records(out: Path, kind: str) -> list[dict]:
    return list(read_records(out / "metrics", kind=kind))


def test_full_finetune_learns_and_writes_the_run_directory(job, tmp_path):
    out = tmp_path / "run"
    summary = run_finetune(_args(job, out, method="full", max_steps=24, eval_every=12, save_every=12))
    assert summary["state"] == "finished" and summary["step"] == 24 and summary["ranks_agree"]
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 25))
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-4:]) / 4
    assert last < first - 1.0, (first, last)
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [0, 12, 24] and evals[0]["baseline"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0
    for field in ("loss", "lr", "grad_norm", "tokens", "tokens_seen", "tokens_per_s", "step_time", "fill"):
        assert field in train[-1], field
    assert {"accuracy", "exact_match", "choice_samples"} <= set(evals[-1])

    run = json.loads((out / "run.json").read_text())
    status = json.loads((out / "status.json").read_text())
    assert run["kind"] == "finetune" and run["plan"]["total_steps"] == 24 and run["world_size"] == 1
    assert status["state"] == "finished" and status["step"] == 24
    assert [r["event"] for r in _records(out, "event")] == ["start", "finish"]
    assert [r["step"] for r in _records(out, "checkpoint")] == [12, 24]
    # best/ and final/ are model directories; the final checkpoint is one too.
    best, final = load_model(out / "best"), load_model(out / "final")
    checkpoint = load_model(out / "checkpoints" / "step-00000024")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, checkpoint.state_dict()[name])
    assert best.config.hidden_size == 48


def test_lora_trains_only_the_adapters_and_merges(job, tmp_path, tiny_tokenizer):
    out = tmp_path / "lora"
    summary = run_finetune(_args(job, out, method="lora", lora_r=4, max_steps=8, eval_every=4, merge=True))
    assert summary["state"] == "finished"
    evals = _records(out, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"]
    run = json.loads((out / "run.json").read_text())
    config = load_model(out / "merged").config
    width = config.num_attention_heads * config.dim_head
    assert run["model"]["trainable"] == config.num_hidden_layers * 2 * 4 * (config.hidden_size + width)

    torch.manual_seed(0)  # the run's seed: the same random base
    base = CpmBeeForCausalLM(
        tiny_config(tiny_tokenizer.vocab_size, hidden_size=48, dim_ff=96, num_hidden_layers=2)
    )
    merged = load_model(out / "merged").state_dict()
    changed = {n for n, t in base.state_dict().items() if not torch.equal(t, merged[n])}
    assert changed and all(n.endswith(("project_q.weight", "project_v.weight")) for n in changed)

    from cpmbee.lora import load_adapter

    batch = prepare_for_finetune(tiny_tokenizer, _choice_task(4, 9))
    with torch.no_grad():
        adapted = load_adapter(base, out / "best")(**batch).logits
        torch.testing.assert_close(load_model(out / "merged")(**batch).logits, adapted, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_continues_exactly(job, tmp_path, method):
    options = dict(method=method, max_steps=10, eval_every=4, save_every=3, grad_accum=2, batch_size=4)
    options["eval_max_samples"] = 8
    run_finetune(_args(job, tmp_path / "straight", **options))
    stopped = run_finetune(_args(job, tmp_path / "resumed", stop_after_steps=5, **options))
    assert stopped["state"] == "stopped" and stopped["step"] == 5
    assert json.loads((tmp_path / "resumed" / "status.json").read_text())["state"] == "stopped"
    resumed = run_finetune(_args(job, tmp_path / "resumed", **options))
    assert resumed["state"] == "finished"

    def losses(name, kind):
        return [(r["step"], r["loss"]) for r in _records(tmp_path / name, kind)]

    assert losses("resumed", "train") == losses("straight", "train")  # bit for bit
    assert losses("resumed", "eval") == losses("straight", "eval")
    assert [r["event"] for r in _records(tmp_path / "resumed", "event")] == [
        "start",
        "stop",
        "resume",
        "finish",
    ]


def test_early_stopping_with_patience(job, tmp_path):
    out = tmp_path / "early"
    summary = run_finetune(_args(job, out, max_steps=40, eval_every=2, patience=2, min_delta=100.0))
    # eval 2 sets the best, evals 4 and 6 do not beat it by 100: stop after step 6
    assert summary["state"] == "finished" and summary["step"] == 6 and summary["best"]["step"] == 2
    finish = _records(out, "event")[-1]
    assert finish["event"] == "finish" and finish["message"].startswith("early stop")
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_objective_and_evaluate_agree_with_the_model(tiny_tokenizer):
    model = random_weights_(CpmBeeForCausalLM(tiny_config(tiny_tokenizer.vocab_size)).eval(), seed=3)
    samples = [*_choice_task(5, 4), {"input": "今天", "<ans>": {"x": "天气", "y": "不错"}}]
    batch = prepare_for_finetune(tiny_tokenizer, samples)
    objective = AnswerObjective(model, unk_id=tiny_tokenizer.unk_id)
    with torch.no_grad():
        out = objective(row_stats=True, **batch)
        full = model(**batch)
    torch.testing.assert_close(out["loss_sum"] / out["tokens"], full.loss, rtol=1e-5, atol=1e-5)

    # exact match = every answer position's best allowed column is the label
    allowed = allowed_output_columns(batch, tiny_tokenizer.vocab_size, tiny_tokenizer.unk_id)
    scores = full.logits.masked_fill(~allowed[:, None, :], float("-inf"))
    labels = batch["labels"]
    expected_exact = [
        bool((scores[b].argmax(-1) == labels[b])[labels[b] != -100].all()) for b in range(len(samples))
    ]
    assert out["row_exact"].tolist() == expected_exact

    metrics = evaluate(objective, samples, FinetuneCollator(tiny_tokenizer), batch_size=4)
    assert metrics["samples"] == 6 and metrics["choice_samples"] == 5
    torch.testing.assert_close(metrics["loss"], float(full.loss), rtol=1e-5, atol=1e-5)
    assert metrics["exact_match"] == pytest.approx(sum(expected_exact) / 6)
    correct = 0
    for sample in samples[:5]:  # accuracy: the most likely option by summed log-likelihood
        losses = []
        for option in sample["options"]:
            b = prepare_for_finetune(tiny_tokenizer, {**sample, "<ans>": option})
            with torch.no_grad():
                losses.append(float(model(**b).loss) * int((b["labels"] != -100).sum()))
        correct += f"<option_{losses.index(min(losses))}>" == sample["<ans>"]
    assert metrics["accuracy"] == pytest.approx(correct / 5)


def test_bad_options_and_data_are_reported(job, tmp_path):
    with pytest.raises(ValueError) as err:
        run_finetune(_args(job, tmp_path / "x", method="sgd", batch_size=0, preset="tiny"))
    message = str(err.value)
    assert "--method" in message and "--batch-size" in message and "exactly one of --model" in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "<ans>": "b"}\n{"input": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no '<ans>' key"):
        run_finetune(_args(job, tmp_path / "y", train=str(bad)))


def test_a_set_with_nothing_to_learn_does_not_train(job, tmp_path):
    """`<ans>: {}` samples have 0 labelled tokens: they once 'trained' at loss 0.0 with exact match 1.0."""
    empty = _write(tmp_path / "empty.jsonl", [{"input": "a", "question": "is", "<ans>": {}}] * 8)
    with pytest.raises(ValueError, match=r"empty.jsonl:1: '<ans>' holds no answer text"):
        run_finetune(_args(job, tmp_path / "z", train=empty, eval=empty, max_steps=2))
    assert not (tmp_path / "z" / "metrics").exists() or not _records(tmp_path / "z", "train")


def test_restart_after_a_crash_is_an_incident(job, tmp_path):
    out = tmp_path / "crashy"
    run_finetune(_args(job, out, max_steps=3, stop_after_steps=1, eval_at_start=False, eval_every=5))
    status = json.loads((out / "status.json").read_text())
    (out / "status.json").write_text(json.dumps({**status, "state": "crashed"}))  # as a killed job leaves it
    run_finetune(_args(job, out, max_steps=3, eval_at_start=False, eval_every=5))
    incidents = _records(out, "incident")
    assert [i["kind"] for i in incidents] == ["restart"] and incidents[0]["step"] == 1


def test_no_resume_refuses_to_mix_runs(job, tmp_path):
    run_finetune(_args(job, tmp_path / "r", max_steps=1, eval_at_start=False))
    with pytest.raises(ValueError, match="already holds a run"):
        run_finetune(_args(job, tmp_path / "r", max_steps=2, resume=False))


def test_command_line(job, tmp_path):
    from cpmbee.__main__ import cli

    options = [
        "--config",
        job["config"],
        "--vocab",
        job["vocab"],
        "--train",
        job["train"],
        "--eval",
        job["eval"],
    ]
    options += ["--out", str(tmp_path / "cli"), "--max-steps", "3", "--eval-every", "3", "--no-progress"]
    options += [
        "--method",
        "full",
        "--gradient-checkpointing",
        "--mixed-precision",
        "bf16",
        "--eval-max-samples",
        "4",
    ]
    result = CliRunner().invoke(cli, ["finetune", *options])
    assert result.exit_code == 0, result.output
    assert "finished at step 3" in result.output
    assert _records(tmp_path / "cli", "eval")[-1]["samples"] == 4
    result = CliRunner().invoke(cli, ["finetune", *options, "--schedule", "bogus"])
    assert result.exit_code != 0 and "bogus" in result.output


def test_choice_accuracy_rises_on_a_learnable_task(job, tmp_path, tiny_tokenizer):
    config = tiny_config(
        tiny_tokenizer.vocab_size, hidden_size=64, dim_ff=128, num_hidden_layers=2, dim_head=16
    )
    config.to_json_file(str(tmp_path / "config.json"))
    train = _write(tmp_path / "train.jsonl", _keyed_task(2000, 0))
    evals = _write(tmp_path / "eval.jsonl", _keyed_task(200, 1))
    out = tmp_path / "keyed"
    run_finetune(
        _args(job, out, config=str(tmp_path / "config.json"), train=train, eval=evals, method="full", lr=1e-2,
              batch_size=16, max_steps=200, eval_every=100, warmup_steps=20, patience=0)
    )  # fmt: skip
    before, *_, after = _records(out, "eval")
    assert before["accuracy"] < 0.5 and after["accuracy"] > 0.8, (before, after)  # chance: 1/3
    assert after["exact_match"] > 0.8


@pytest.mark.slow
def test_two_processes_compute_what_one_process_does(job, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP), batch 4 each == 1 process with batch 8."""
    common = [
        "--config",
        job["config"],
        "--vocab",
        job["vocab"],
        "--train",
        job["train"],
        "--eval",
        job["eval"],
    ]
    common += ["--max-steps", "6", "--eval-every", "3", "--no-progress", "--method", "full", "--lr", "3e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", port]
    two = subprocess.run(
        [*launch, "-m", "cpmbee", "finetune", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "cpmbee", "finetune", *common, "--batch-size", "8", "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    run = json.loads((tmp_path / "two" / "run.json").read_text())
    finish = _records(tmp_path / "two", "event")[-1]
    assert run["world_size"] == 2 and finish["world_size"] == 2 and finish["ranks_agree"] is True
    for kind in ("train", "eval"):
        a = [(r["step"], r["loss"]) for r in _records(tmp_path / "two", kind)]
        b = [(r["step"], r["loss"]) for r in _records(tmp_path / "one", kind)]
        assert [s for s, _ in a] == [s for s, _ in b]
        for (_, x), (_, y) in zip(a, b):
            assert x == pytest.approx(y, rel=1e-5)
    final_two, final_one = load_model(tmp_path / "two" / "final"), load_model(tmp_path / "one" / "final")
    for name, tensor in final_one.state_dict().items():
        torch.testing.assert_close(final_two.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
