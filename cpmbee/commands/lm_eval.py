"""``cpmbee lm-eval``: lm-evaluation-harness's own command line with the ``cpmbee`` model registered."""

from __future__ import annotations

import sys

import click


@click.command(
    name="lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args: tuple[str, ...]) -> None:
    """Run lm-eval (`lm-eval ARGS…`) with `--model cpmbee` available; needs `pip install 'cpmbee[eval]'`.

    \b
    cpmbee lm-eval run --model cpmbee --model_args pretrained=DIR --batch_size 8 --tasks copa
    cpmbee lm-eval run --model cpmbee --tasks my_task --include_path my_tasks/   (local task YAML)

    Model arguments (docs/evaluation.md): pretrained (default: the embedded model), device, dtype,
    max_length, window, score_eos. Give the batch size with lm-eval's --batch_size.
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        from ..evaluation import lm_eval_adapter  # noqa: F401  (registers the model)
    except ImportError as err:
        raise click.ClickException(f"{err}; install it with: pip install 'cpmbee[eval]'") from err
    sys.argv = ["lm-eval", *args]
    cli_evaluate()
