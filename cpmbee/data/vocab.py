"""Build a vocabulary in the CPM-Bee ``vocab.txt`` format from a corpus.

The layout follows the released vocabulary, so every tool that knows CPM-Bee ids keeps working:

1. the fixed special tokens at ids 0–10: ``<pad> <unk> <mask> <sep> </n> </_> <s> </s> <root> <ans> <option>``
   (``</n>`` and ``</_>`` are the newline and space characters);
2. every printable ASCII character (so code, numbers and URLs never fall back to unknown runs), then
   the other characters of the corpus that occur at least ``min_char_count`` times, most frequent first —
   CJK text is tokenized character by character as in CPM-Bee;
3. ``<eod>``;
4. English sub-word pieces learned with a BPE trainer (``tokenizers``) over words with their leading space
   (``" the"``, ``"ing"``, ``" Beijing"``), most useful first; they get up to ``english_share`` of the
   entries, characters the rest.

The tokenizer splits text by greedy longest match, so learned pieces are used whole when they occur and
any English word still splits into shorter pieces or single letters.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from .jsonl import iter_jsonl

__all__ = ["SPECIAL_TOKENS", "build_vocab", "iter_corpus_texts", "write_vocab"]

SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    "<mask>",
    "<sep>",
    "</n>",
    "</_>",
    "<s>",
    "</s>",
    "<root>",
    "<ans>",
    "<option>",
]
_WHITESPACE_ENTRY = {"\n": "</n>", " ": "</_>"}
_ASCII = [chr(c) for c in range(33, 127)]
_SPECIAL_IN_TEXT = re.compile(r"<(?!<)[^<>]*>")
_WORD = re.compile(r" ?[A-Za-z]+")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, child in value.items():
            yield str(key)
            yield from _strings(child)
    elif isinstance(value, list):
        for child in value:
            yield from _strings(child)


def iter_corpus_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Texts of corpus files: ``.jsonl`` (every string of each record; a ``{"text": ...}`` record is plain
    text) or anything else as plain text, one document per line. CPM-Bee escapes (``<<``) and special tokens
    (``<mask_0>``) in JSONL strings are removed before counting."""
    for path in paths:
        path = Path(path)
        if path.suffix == ".jsonl":
            for _, record in iter_jsonl(path, objects=False):
                for text in _strings(record):
                    yield _SPECIAL_IN_TEXT.sub("", text).replace("<<", "<")
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")


def _learn_english_pieces(words: Counter[str], budget: int) -> list[str]:
    """BPE pieces over (leading-space) English words with their true counts, most useful first."""
    if budget <= 0 or not words:
        return []
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    # Each word arrives as one newline-separated run of its repetitions; " of" stays " of".
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="removed"),
            pre_tokenizers.Split(" ", behavior="merged_with_next"),
        ]
    )
    alphabet = sorted({c for w in words for c in w})
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + budget, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(
        ("\n".join([w] * n) for w, n in words.items()), trainer=trainer, length=len(words)
    )
    vocab = tok.get_vocab()
    return [piece for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if len(piece) > 1][:budget]


def build_vocab(
    texts: Iterable[str], *, vocab_size: int = 16000, min_char_count: int = 2, english_share: float = 0.35
) -> list[str]:
    """Vocabulary entries in id order (``</n>``/``</_>`` spelled as in the file).

    Up to ``english_share`` of ``vocab_size`` goes to learned English pieces; characters take the rest
    (and whatever the English pieces leave unused).
    """
    fixed = len(SPECIAL_TOKENS) + len(_ASCII) + 1  # + <eod>
    if vocab_size < fixed:
        raise ValueError(f"vocab_size must be at least {fixed}, got {vocab_size}")
    if not 0.0 <= english_share <= 1.0:
        raise ValueError(f"english_share must be in [0, 1], got {english_share}")
    chars: Counter[str] = Counter()
    words: Counter[str] = Counter()
    for text in texts:
        chars.update(text)
        words.update(_WORD.findall(text))
    entries = [*SPECIAL_TOKENS, *_ASCII]
    seen = set(entries) | set(_WHITESPACE_ENTRY) | {"<eod>"}
    pieces = [
        p for p in _learn_english_pieces(words, int((vocab_size - fixed) * english_share)) if p not in seen
    ]
    char_budget = vocab_size - fixed - len(pieces)
    for c, n in chars.most_common():
        if n < min_char_count or char_budget <= 0:
            break
        if c not in seen and c.isprintable():
            entries.append(c)
            seen.add(c)
            char_budget -= 1
    entries.append("<eod>")
    entries.extend(p for p in pieces if p not in seen)
    return entries


def write_vocab(entries: list[str], path: str | os.PathLike) -> Path:
    """Write entries one per line (atomically)."""
    return write_text_atomic(path, "\n".join(entries) + "\n")
