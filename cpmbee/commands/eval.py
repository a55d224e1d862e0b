"""``cpmbee eval``: score a model on task files (choice, generation, perplexity) into a JSON report."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .options import ModelArgs, generation_options, model_options, pop_generation_options

if TYPE_CHECKING:
    from ..hf import CpmBeeForCausalLM


def _check(options: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Every problem with the options at once (a usage error), else the generation options."""
    from ..generation_options import GenerationOptions

    problems = [
        f"--{name.replace('_', '-')} must be positive, got {options[name]}"
        for name in ("batch_size", "max_length", "window")
        if options[name] < 1
    ]
    if options["limit"] is not None and options["limit"] < 1:
        problems.append(f"--limit must be positive, got {options['limit']}")
    generation = pop_generation_options(options)
    try:
        GenerationOptions.parse(generation)
    except ValueError as err:
        problems.append(str(err))
    names = [Path(t).stem for t in tasks]
    if len(set(names)) != len(names):
        problems.append(f"--task files need distinct names, got {names}")
    if problems:
        raise click.UsageError("; ".join(problems))
    return generation


def _report_config(
    model_args: ModelArgs, model: CpmBeeForCausalLM, options: dict[str, Any], generation: dict[str, Any]
) -> dict[str, Any]:
    import torch

    return {
        "model": model_args.model or "(embedded default model)",
        **{k: v for k, v in options.items() if k != "predictions"},
        "generation": generation,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


@click.command(name="eval")
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
@click.option(
    "--max-length", default=2048, show_default=True, type=int, help="Likelihood rows are cut to this."
)
@click.option("--window", default=256, show_default=True, type=int, help="Perplexity window in tokens.")
@click.option("--predictions", is_flag=True, help="Put per-example predictions in the report.")
@click.option(
    "--output", "-o", default=None, type=click.Path(dir_okay=False), help="Write the JSON report here."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@model_options
@generation_options(only=("beam_size", "max_new_tokens"), defaults={"beam_size": 1, "max_new_tokens": 32})
def eval_command(tasks: tuple[str, ...], output: str | None, no_progress: bool, **options: Any) -> None:
    """Evaluate a model on CPM-Bee task files and print a table (docs/evaluation.md).

    \b
    choice      {"input": …, "options": {"<option_0>": …}, "question": …, "<ans>": "<option_2>"}
                accuracy by option likelihood (+ by generation with --by-generation)
    generation  {…, "<ans>": "reference"}: exact match and token F1 of generated answers
    perplexity  {"text": …} lines or a .txt file: NLL per token, perplexity, bits per character

    Generated answers use --beam-size (default greedy) and --max-new-tokens.
    """
    from ..evaluation.tasks import format_table, run_task
    from ..files import write_text_atomic

    model_args = ModelArgs.pop_from(options)
    generation = _check(options, tasks)
    start = time.perf_counter()
    model, tokenizer = model_args.load()
    report: dict[str, Any] = {
        "config": _report_config(model_args, model, options, generation),
        "tasks": {},
        "timing": {"load_s": round(time.perf_counter() - start, 3)},
    }
    start = time.perf_counter()
    for task in tasks:
        try:
            report["tasks"][Path(task).stem] = run_task(
                model, tokenizer, task, generation=generation, show_progress=not no_progress, **options
            )
        except ValueError as err:
            raise click.ClickException(f"--task {task}: {err}") from err
    report["timing"]["eval_s"] = round(time.perf_counter() - start, 3)
    click.echo(format_table(report))
    if output:
        write_text_atomic(output, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        click.echo(f"report written to {output}")
