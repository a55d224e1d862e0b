"""``cpmbee build-vocab``: a CPM-Bee-format vocab.txt from a corpus."""

from __future__ import annotations

import click


@click.command("build-vocab")
@click.argument("corpus", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write vocab.txt."
)
@click.option("--size", "vocab_size", default=16000, show_default=True, help="Number of entries.")
@click.option("--min-char-count", default=2, show_default=True, help="Drop characters seen fewer times.")
@click.option(
    "--english-share", default=0.35, show_default=True, help="At most this share for English pieces."
)
def build_vocab(
    corpus: tuple[str, ...], output: str, vocab_size: int, min_char_count: int, english_share: float
) -> None:
    """Build a vocabulary from CORPUS files (.jsonl of CPM-Bee records or plain text, one document per line).

    The result has CPM-Bee's special tokens at their usual ids, character-level CJK and English
    sub-word pieces, and loads with CpmBeeTokenizer(output).
    """
    from ..data.vocab import build_vocab as build
    from ..data.vocab import iter_corpus_texts, write_vocab
    from ..hf import CpmBeeTokenizer

    try:
        entries = build(
            iter_corpus_texts(corpus),
            vocab_size=vocab_size,
            min_char_count=min_char_count,
            english_share=english_share,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    path = write_vocab(entries, output)
    CpmBeeTokenizer(path)  # must load
    click.echo(f"wrote {len(entries)} entries to {path}")
