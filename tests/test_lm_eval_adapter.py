"""The lm-evaluation-harness adapter, offline: LM methods on Instances, and simple_evaluate on local tasks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cpmbee import CpmBeeForCausalLM
from cpmbee.data.finetune import prepare_for_finetune
from cpmbee.evaluation.perplexity import text_windows
from tests.conftest import random_weights_, tiny_config

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from cpmbee.evaluation.lm_eval_adapter import CpmBeeLM, to_bee_input  # noqa: E402


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    model = random_weights_(CpmBeeForCausalLM(tiny_config(tiny_tokenizer.vocab_size)).eval(), seed=7)
    return CpmBeeLM(model=model, tokenizer=tiny_tokenizer, batch_size=3)


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _token_logprobs(lm: CpmBeeLM, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and greedy check of every labelled position, straight from the model."""
    batch = prepare_for_finetune(lm.tokenizer, sample)
    with torch.no_grad():
        logits = lm.model(**batch).logits[0].float()
    labels = batch["labels"][0].long()
    mask = labels != -100
    logp = torch.log_softmax(logits[mask], dim=-1)
    picked = logp.gather(1, labels[mask][:, None])[:, 0]
    return picked, logits[mask].argmax(-1) == labels[mask]


def test_registered_under_cpmbee():
    from lm_eval.api.registry import get_model

    assert get_model("cpmbee") is CpmBeeLM


def test_loglikelihood_is_the_answer_segment_likelihood(lm):
    pairs = [("今天天气", "不错"), ("the input is", " on the prompt"), ("", "中国"), ("a <b>", "c<d")]
    results = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        per_token, right = _token_logprobs(lm, to_bee_input(context, continuation))
        assert logprob == pytest.approx(float(per_token[:-1].sum()), rel=1e-4)  # the closing </s> not scored
        assert greedy == bool(right[:-1].all())
    assert to_bee_input("a <b>", "c<d") == {"input": "a <<b>", "<ans>": "c<<d"}

    with_eos = CpmBeeLM(model=lm.model, tokenizer=lm.tokenizer, score_eos="true")
    ((logprob, _),) = with_eos.loglikelihood(_instances("loglikelihood", pairs[:1]), disable_tqdm=True)
    assert logprob == pytest.approx(float(_token_logprobs(lm, to_bee_input(*pairs[0]))[0].sum()), rel=1e-4)


def test_long_contexts_lose_their_beginning(lm):
    short = CpmBeeLM(model=lm.model, tokenizer=lm.tokenizer, max_length=24)
    context = "the input is on the prompt " * 10
    ((logprob, _),) = short.loglikelihood(
        _instances("loglikelihood", [(context, " question")]), disable_tqdm=True
    )
    kept = short._fit(context, " question")
    assert context.endswith(kept["input"]) and len(kept["input"]) < len(context)
    assert logprob == pytest.approx(float(_token_logprobs(lm, kept)[0][:-1].sum()), rel=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        short.loglikelihood(_instances("loglikelihood", [("x", "the " * 30)]), disable_tqdm=True)


def test_loglikelihood_rolling_sums_the_windows(lm):
    text = "今天天气不错，the input is on the prompt。" * 3
    small = CpmBeeLM(model=lm.model, tokenizer=lm.tokenizer, window=5)
    (total,) = small.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    expected = sum(float(_token_logprobs(lm, w)[0][:-1].sum()) for w in text_windows(lm.tokenizer, text, 5))
    assert total == pytest.approx(expected, rel=1e-4)


def test_generate_until_cuts_at_the_stop_string(lm):
    generation = pytest.importorskip("cpmbee.generation")
    requests = [("今天天气", {"until": ["\n"], "max_gen_toks": 6}), ("the input", {"max_gen_toks": 4})]
    outputs = lm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    for (context, kwargs), text in zip(requests, outputs):
        raw = generation.generate(
            lm.model,
            lm.tokenizer,
            to_bee_input(context, ""),
            beam_size=1,
            max_new_tokens=kwargs["max_gen_toks"],
        )["<ans>"]
        assert text == (raw or "").replace("<<", "<").split("\n")[0]
    # a stop string that the greedy output contains: the answer ends right before it
    first = outputs[1]
    if len(first) > 1:
        stop = first[1:]
        (cut,) = lm.generate_until(
            _instances("generate_until", [("the input", {"until": [stop], "max_gen_toks": 4})]),
            disable_tqdm=True,
        )
        assert cut == first[: first.index(stop)]


def test_bad_arguments_name_the_field(lm):
    with pytest.raises(ValueError, match="batch_size"):
        CpmBeeLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="model and tokenizer"):
        CpmBeeLM(model=lm.model)
    assert CpmBeeLM(model=lm.model, tokenizer=lm.tokenizer, batch_size="auto").batch_size == 8


def test_simple_evaluate_runs_local_tasks_end_to_end(lm, tmp_path):
    pytest.importorskip("cpmbee.generation")
    from lm_eval.tasks import TaskManager

    rows = [
        {"premise": "the input is", "good": "on the prompt", "bad": "in 北京", "label": 0, "answer": "on"},
        {"premise": "今天天气", "good": "不错", "bad": "中国", "label": 0, "answer": "不错"},
        {"premise": "the question", "good": "is", "bad": "an input", "label": 1, "answer": "is"},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "choice.yaml").write_text(
        "task: toy_choice\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{premise}}"\ndoc_to_choice: "{{[good, bad]}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    (tmp_path / "gen.yaml").write_text(
        "task: toy_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{premise}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )
    (tmp_path / "ppl.yaml").write_text(
        "task: toy_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{premise}} {{good}}"\n'
        "metric_list:\n  - metric: word_perplexity\n",
        encoding="utf-8",
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy_choice", "toy_gen", "toy_ppl"], task_manager=manager)
    results = out["results"]

    # acc is what loglikelihood says, document by document
    choices = [[(r["premise"], " " + r["good"]), (r["premise"], " " + r["bad"])] for r in rows]
    picks = []
    for pair in choices:
        scores = lm.loglikelihood(_instances("loglikelihood", pair), disable_tqdm=True)
        picks.append(max(range(2), key=lambda k: scores[k][0]))
    assert results["toy_choice"]["acc,none"] == pytest.approx(
        sum(p == r["label"] for p, r in zip(picks, rows)) / 3
    )
    assert 0.0 <= results["toy_gen"]["exact_match,none"] <= 1.0
    assert results["toy_ppl"]["word_perplexity,none"] > 1.0


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_local_task(lm, tmp_path):
    """`cpmbee lm-eval run --model cpmbee …` end to end in a fresh process (lm-eval's start-up is slow)."""
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_vocabulary(str(model_dir))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"q": "the input", "a": "is", "b": "in 北京", "label": 0}\n', encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(
        f"task: toy_cli\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{[a, b]}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )
    out = tmp_path / "results"
    command = [sys.executable, "-m", "cpmbee", "lm-eval", "run", "--model", "cpmbee"]
    command += ["--model_args", f"pretrained={model_dir}", "--batch_size", "2", "--device", "cpu"]
    command += ["--tasks", "toy_cli", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "toy_cli" in done.stdout and "acc" in done.stdout
    (results,) = out.rglob("results_*.json")
    assert json.loads(results.read_text())["results"]["toy_cli"]["acc,none"] in (0.0, 1.0)
