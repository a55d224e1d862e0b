"""``cpmbee generate``: fill the ``<ans>`` slots of CPM-Bee dicts from the command line."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from .options import ModelArgs, generation_options, model_options, pop_generation_options

if TYPE_CHECKING:
    from ..generation_options import GenerationOptions
    from ..hf import CpmBeeForCausalLM, CpmBeeTokenizer


def _read_inputs(data: str | None) -> Iterator[tuple[str, Any]]:
    """``(where, dict)`` from the argument, or from JSONL on stdin (one dict per line)."""
    if data is not None:
        try:
            yield "argument", json.loads(data)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not valid JSON ({e})", param_hint="DATA") from None
        return
    if sys.stdin.isatty():
        raise click.UsageError("give a JSON dict as DATA, or JSONL on stdin")
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            yield f"stdin line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise click.UsageError(f"stdin line {number}: not valid JSON ({e})") from None


def _batches(items: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    batch: list[tuple[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_SAMPLING_ONLY = ("do_sample", "stop", "min_new_tokens")  # options that need beam size 1


def _options(given: dict[str, Any], stream: bool) -> GenerationOptions:
    """``GenerationOptions`` of the command line; without ``--beam-size``: 3 beams, or 1 when streaming or
    when an option needs it."""
    from ..generation_options import GenerationOptions

    if "beam_size" not in given:
        given["beam_size"] = 1 if stream or any(given.get(k) for k in _SAMPLING_ONLY) else 3
    try:
        options = GenerationOptions.parse(given)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream and options.beam_size != 1:
        raise click.BadParameter(
            "streaming needs --beam-size 1 (greedy or sampling)", param_hint="--beam-size"
        )
    return options


def _write_stream(
    model: CpmBeeForCausalLM, tokenizer: CpmBeeTokenizer, data: Any, options: GenerationOptions
) -> None:
    from ..generation import stream_generate

    for event in stream_generate(model, tokenizer, data, options):
        text = "\n" + json.dumps(event.result, ensure_ascii=False) + "\n" if event.done else event.text
        sys.stdout.write(text)
        sys.stdout.flush()


def _write_batch(
    model: CpmBeeForCausalLM,
    tokenizer: CpmBeeTokenizer,
    batch: list[tuple[str, Any]],
    options: GenerationOptions,
) -> None:
    from ..generation import generate as run_generate

    try:
        results = run_generate(model, tokenizer, [d for _, d in batch], options)
    except ValueError as e:
        where = batch[0][0] if len(batch) == 1 else f"{batch[0][0]} … {batch[-1][0]}"
        raise click.ClickException(f"{where}: {e}") from None
    for result in results:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@click.command()
@click.argument("data", required=False)
@model_options
@generation_options(defaults={"beam_size": None})
@click.option("--stream", is_flag=True, help="Print answer text as it is generated, then the filled JSON.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Stdin rows generated together.")
def generate(data: str | None, stream: bool, batch_size: int, **options: Any) -> None:
    """Fill the <ans> slots of DATA (a CPM-Bee dict as JSON), or of each JSONL line on stdin.

    Without --beam-size: the original's beam search (3 beams), or greedy (1) with --stream, --do-sample,
    --stop or --min-new-tokens.

    \b
    cpmbee generate '{"input": "今天天气不错，", "<ans>": ""}'
    cpmbee generate --stream --max-new-tokens 32 '{"input": "北京", "prompt": "英文", "<ans>": ""}'
    cat prompts.jsonl | cpmbee generate --model cpm-bee-1b/ > answers.jsonl
    """
    if batch_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--batch-size")
    model_args = ModelArgs.pop_from(options)
    generation = _options(pop_generation_options(options), stream)
    inputs = _read_inputs(data)
    first = next(inputs, None)  # fail on bad input before spending time loading the model
    if first is None:
        raise click.UsageError("no input on stdin")
    model, tokenizer = model_args.load()
    rows = itertools.chain([first], inputs)
    for batch in _batches(rows, 1 if stream else batch_size):
        if stream:
            try:
                _write_stream(model, tokenizer, batch[0][1], generation)
            except ValueError as e:
                raise click.ClickException(f"{batch[0][0]}: {e}") from None
        else:
            _write_batch(model, tokenizer, batch, generation)
