"""``cpmbee convert``: original checkpoint → self-contained HF-style safetensors directory."""

from __future__ import annotations

import click

from .options import DTYPE


@click.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Model config JSON (either naming style). Default: config.json or the one *.json beside SRC.",
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False),
    help="vocab.txt to ship with the model. Default: vocab.txt beside SRC.",
)
@click.option(
    "--dtype",
    type=DTYPE,
    default=None,
    help="Store the weights in this dtype (default: as in SRC; fp32, bf16, fp16 accepted).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
def convert(
    src: str, dst: str, config_path: str | None, vocab: str | None, dtype: str | None, max_shard_size: str
) -> None:
    """Convert SRC (a cpm-bee-*.pt file or a checkpoint directory) into DST.

    DST gets config.json, generation_config.json, model*.safetensors, vocab.txt and tokenizer_config.json,
    loadable with AutoModelForCausalLM/AutoTokenizer.from_pretrained(DST) after `import cpmbee`. DST is
    written to a temporary directory first and moved into place only when complete.
    """
    from ..checkpoint import convert as run_convert

    try:
        out = run_convert(
            src, dst, config=config_path, vocab=vocab, dtype=dtype, max_shard_size=max_shard_size
        )
    except (OSError, ValueError) as err:  # OSError: a missing input, or a full disk while writing DST
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out}")
