"""``cpmbee eval``: score a model on task files (choice, generation, perplexity) into a JSON report."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click


@click.command(name="eval")
@click.option("--model", "model_path", default=None, help="Model directory (default: the embedded model).")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Task file (.jsonl, or .txt for perplexity); repeat for several tasks.",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "choice", "generation", "perplexity"]),
    default="auto",
    show_default=True,
    help="Task kind; auto tells it from the records.",
)
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="Rows per forward / generate call."
)
@click.option("--limit", default=None, type=int, help="Evaluate the first N examples of each task only.")
@click.option("--by-generation", is_flag=True, help="Choice tasks: also score by generating the answer.")
@click.option("--beam-size", default=1, show_default=True, type=int, help="Generation: beams (1 = greedy).")
@click.option(
    "--max-new-tokens", default=32, show_default=True, type=int, help="Generation: answer length cap."
)
@click.option(
    "--max-length", default=2048, show_default=True, type=int, help="Likelihood rows are cut to this."
)
@click.option("--window", default=256, show_default=True, type=int, help="Perplexity window in tokens.")
@click.option("--device", default=None, help="torch device (default: CUDA when available, else CPU).")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@click.option("--predictions", is_flag=True, help="Put per-example predictions in the report.")
@click.option(
    "--output", "-o", default=None, type=click.Path(dir_okay=False), help="Write the JSON report here."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_command(
    model_path: str | None,
    tasks: tuple[str, ...],
    kind: str,
    batch_size: int,
    limit: int | None,
    by_generation: bool,
    beam_size: int,
    max_new_tokens: int,
    max_length: int,
    window: int,
    device: str | None,
    dtype: str | None,
    predictions: bool,
    output: str | None,
    no_progress: bool,
) -> None:
    """Evaluate a model on CPM-Bee task files and print a table (docs/evaluation.md).

    \b
    choice      {"input": …, "options": {"<option_0>": …}, "question": …, "<ans>": "<option_2>"}
                accuracy by option likelihood (+ by generation with --by-generation)
    generation  {…, "<ans>": "reference"}: exact match and token F1 of generated answers
    perplexity  {"text": …} lines or a .txt file: NLL per token, perplexity, bits per character
    """
    import torch

    from ..evaluation.tasks import format_table, run_task

    problems = [
        f"{name} must be positive, got {value}"
        for name, value in (
            ("--batch-size", batch_size),
            ("--beam-size", beam_size),
            ("--max-new-tokens", max_new_tokens),
            ("--max-length", max_length),
            ("--window", window),
        )
        if value < 1
    ]
    if limit is not None and limit < 1:
        problems.append(f"--limit must be positive, got {limit}")
    if problems:
        raise click.UsageError("; ".join(problems))
    names = [Path(t).stem for t in tasks]
    if len(set(names)) != len(names):
        raise click.UsageError(f"--task files need distinct names, got {names}")

    from ..api import load_model_and_tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    try:
        model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(f"--model: {err}") from err
    load_s = time.perf_counter() - start
    generation = {"beam_size": beam_size, "max_new_tokens": max_new_tokens}
    report: dict = {
        "config": {
            "model": model_path or "(embedded default model)",
            "kind": kind,
            "batch_size": batch_size,
            "limit": limit,
            "by_generation": by_generation,
            "generation": generation,
            "max_length": max_length,
            "window": window,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "tasks": {},
        "timing": {"load_s": round(load_s, 3)},
    }
    start = time.perf_counter()
    for name, task in zip(names, tasks):
        try:
            report["tasks"][name] = run_task(
                model,
                tokenizer,
                task,
                kind=kind,
                batch_size=batch_size,
                limit=limit,
                by_generation=by_generation,
                generation=generation,
                max_length=max_length,
                window=window,
                predictions=predictions,
                show_progress=not no_progress,
            )
        except ValueError as err:
            raise click.ClickException(f"--task {task}: {err}") from err
    report["timing"]["eval_s"] = round(time.perf_counter() - start, 3)
    click.echo(format_table(report))
    if output:
        from ..files import write_text_atomic

        write_text_atomic(output, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        click.echo(f"report written to {output}")
