"""``cpmbee merge-lora``: fold a LoRA adapter (PEFT directory or OpenDelta delta) into a base model."""

from __future__ import annotations

import click

from .options import DTYPE


@click.command(name="merge-lora")
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapter", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option(
    "--alpha",
    type=float,
    default=16.0,
    show_default=True,
    help="lora_alpha of an OpenDelta delta file (scaling alpha / r); PEFT directories carry their own.",
)
@click.option(
    "--dtype",
    type=DTYPE,
    default=None,
    help="Dtype of the merged weights (default: the base checkpoint's; fp32, bf16, fp16 accepted). The merge itself is float32.",
)
@click.option(
    "--vocab",
    type=click.Path(exists=True, dir_okay=False),
    help="vocab.txt to ship with the model. Default: vocab.txt beside BASE.",
)
def merge_lora(base: str, adapter: str, dst: str, alpha: float, dtype: str | None, vocab: str | None) -> None:
    """Merge ADAPTER into BASE and write DST (safetensors, config.json, vocab.txt).

    BASE is any checkpoint `cpmbee.checkpoint.load_model` reads; ADAPTER a PEFT adapter directory (from
    `cpmbee finetune`) or an OpenDelta delta file from the original fine-tuning (`*-delta-best.pt`).
    DST loads like any model directory, without peft, at the base model's speed.
    """
    from ..checkpoint import load_model
    from ..files import find_vocab
    from ..hf import CpmBeeTokenizer
    from ..lora import load_adapter, save_merged

    try:
        vocab_path = find_vocab(base, vocab)
        model = load_model(base, dtype=dtype)
        model = load_adapter(model, adapter, alpha=alpha)
        save_merged(model, dst, CpmBeeTokenizer(vocab_path))
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {dst}")
