"""``cpmbee generate``: fill the ``<ans>`` slots of CPM-Bee dicts from the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click


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


@click.command()
@click.argument("data", required=False)
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Model directory or .pt file (default: the embedded demo model).",
)
@click.option(
    "--beam-size",
    type=int,
    default=None,
    help="Beams (default 3; 1 = greedy/sampling, the default with --stream).",
)
@click.option("--max-new-tokens", type=int, default=100, show_default=True)
@click.option("--min-new-tokens", type=int, default=0, show_default=True, help="Per answer (beam size 1).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--repetition-window", type=int, default=None, help="Penalise only the last N fed tokens.")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy (beam size 1).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, help="Stop string ending an answer (repeatable; beam size 1).")
@click.option("--stream", is_flag=True, help="Print answer text as it is generated, then the filled JSON.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Stdin rows generated together.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, … (default: CUDA when available).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option(
    "--quantize", type=click.Choice(["int8", "nf4"]), default=None, help="Weight-only quantization."
)
@click.option(
    "--memory-limit", default=None, help="Spread layers over devices, e.g. '4GiB' or 'cuda:0=4GiB,cpu=8GiB'."
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the decode step: a slow first step, faster after (long outputs, many inputs).",
)
def generate(
    data: str | None,
    model_path: str | None,
    beam_size: int | None,
    max_new_tokens: int,
    min_new_tokens: int,
    repetition_penalty: float,
    repetition_window: int | None,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: tuple[str, ...],
    stream: bool,
    batch_size: int,
    device: str | None,
    dtype: str | None,
    quantize: str | None,
    memory_limit: str | None,
    compile_: bool,
) -> None:
    """Fill the <ans> slots of DATA (a CPM-Bee dict as JSON), or of each JSONL line on stdin.

    \b
    cpmbee generate '{"input": "今天天气不错，", "<ans>": ""}'
    cpmbee generate --stream --max-new-tokens 32 '{"input": "北京", "prompt": "英文", "<ans>": ""}'
    cat prompts.jsonl | cpmbee generate --model cpm-bee-1b/ > answers.jsonl
    """
    from ..api import load_model_and_tokenizer
    from ..generation import GenerationOptions, stream_generate
    from ..generation import generate as run_generate

    if batch_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--batch-size")
    if beam_size is None:
        beam_size = 1 if (stream or do_sample or stop or min_new_tokens) else 3
    try:
        options = GenerationOptions.parse(
            beam_size=beam_size,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            repetition_window=repetition_window,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if stream and options.beam_size != 1:
        raise click.BadParameter(
            "streaming needs --beam-size 1 (greedy or sampling)", param_hint="--beam-size"
        )

    inputs = _read_inputs(data)
    first = next(inputs, None)  # fail on bad input before spending time loading the model
    if first is None:
        raise click.UsageError("no input on stdin")
    dispatch = {"max_memory": memory_limit} if memory_limit else {}
    try:
        model, tokenizer = load_model_and_tokenizer(
            model_path, device=device, dtype=dtype, quantize=quantize, compile=compile_, **dispatch
        )
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None

    def all_inputs() -> Iterator[tuple[str, Any]]:
        yield first
        yield from inputs

    out = click.get_text_stream("stdout")
    for batch in _batches(all_inputs(), 1 if stream else batch_size):
        rows = [d for _, d in batch]
        try:
            if stream:
                for event in stream_generate(model, tokenizer, rows[0], options):
                    if event.done:
                        out.write("\n" + json.dumps(event.result, ensure_ascii=False) + "\n")
                    else:
                        out.write(event.text)
                    out.flush()
                continue
            results = run_generate(model, tokenizer, rows, options)
        except ValueError as e:
            where = batch[0][0] if len(batch) == 1 else f"{batch[0][0]} … {batch[-1][0]}"
            raise click.ClickException(f"{where}: {e}") from None
        for result in results:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
