"""Perplexity of plain text, read through CPM-Bee's structured format as language-model input.

**How text becomes CPM-Bee input.** CPM-Bee has no plain-LM mode: every token belongs to a segment of a
structured dict, and only the segments under ``<ans>`` are predicted. Plain text is therefore put where the
pre-training LM transform (``configs/pretrain/transforms/lm.py``) puts it: the text is escaped (``<`` →
``<<``), split at token boundaries into windows of at most ``window`` tokens, and window ``k`` becomes

    {"input": <window k-1, or "" for the first>, "<ans>": <window k>}

so each window after the first is read with the window before it as context (at most ``2 × window`` text
tokens per forward, plus about 10 structure tokens).

**Which tokens are scored.** Every text token of every window, exactly once, each predicted from the
``<s>`` that opens the answer segment and the answer tokens before it (and the context window). The
closing ``</s>`` of a window is *not* scored (a window boundary is not the end of the text), and neither
are the structure tokens. ``nll`` is the mean over scored tokens (nats), ``perplexity = exp(nll)``, and
``bits_per_char`` = total NLL / ln 2 / characters of the text, which does not depend on the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.finetune import FinetuneCollator
from ..tokenizer import SPECIAL, CpmBeeTokenizerBase, escape
from .likelihood import score_answers

__all__ = ["TextScore", "score_texts", "summarize", "text_windows"]


@dataclass
class TextScore:
    """Summed NLL of one text's tokens (nats), how many tokens, and how many characters."""

    nll: float
    tokens: int
    chars: int


def text_windows(tokenizer: CpmBeeTokenizerBase, text: str, window: int) -> list[dict[str, str]]:
    """The CPM-Bee samples that score ``text`` (unescaped plain text), as the module docstring describes."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    pieces = tokenizer.pieces(escape(text))
    chunks = [
        "".join(p.text if p.kind == SPECIAL else escape(p.text) for p in pieces[i : i + window])
        for i in range(0, len(pieces), window)
    ]
    return [{"input": chunks[k - 1] if k else "", "<ans>": chunk} for k, chunk in enumerate(chunks)]


def score_texts(
    objective: torch.nn.Module,
    tokenizer: CpmBeeTokenizerBase,
    texts: Sequence[str],
    *,
    window: int = 256,
    batch_size: int = 8,
    device: Any = None,
    progress: Callable[[int], Any] | None = None,
) -> list[TextScore]:
    """Score plain texts with an ``AnswerObjective``; ``progress(n)`` gets the number of windows done.

    Empty texts score 0 tokens. Windows of all texts are batched together.
    """
    owners: list[int] = []
    samples: list[dict[str, str]] = []
    for index, text in enumerate(texts):
        windows = text_windows(tokenizer, text, window)
        owners.extend([index] * len(windows))
        samples.extend(windows)
    collator = FinetuneCollator(tokenizer, max_length=2 * window + 64, truncation=False)
    scores = (
        score_answers(objective, samples, collator, batch_size=batch_size, device=device, progress=progress)
        if samples
        else []
    )
    out = [TextScore(0.0, 0, len(text)) for text in texts]
    for index, score in zip(owners, scores):
        out[index].nll += score.nll(include_eos=False)
        out[index].tokens += score.tokens(include_eos=False)
    return out


def summarize(scores: Sequence[TextScore]) -> dict[str, float]:
    """Corpus-level ``nll`` (per token), ``perplexity``, ``bits_per_char``, ``tokens``, ``chars``."""
    nll = sum(s.nll for s in scores)
    tokens = sum(s.tokens for s in scores)
    chars = sum(s.chars for s in scores)
    mean = nll / tokens if tokens else float("nan")
    return {
        "nll": mean,
        "perplexity": math.exp(mean) if tokens else float("nan"),
        "bits_per_char": nll / math.log(2) / chars if chars else float("nan"),
        "tokens": tokens,
        "chars": chars,
    }
