"""Text metrics for generated answers, and reading a generated answer back as a choice option.

**Normalization** (both sides, before either metric): CPM-Bee escapes (``<<``) are undone, text is
NFKC-normalized (full-width letters and digits become ASCII) and lower-cased, punctuation (Unicode category
``P*``, ASCII and CJK alike) becomes a space, the English articles *a, an, the* are dropped, and whitespace
is collapsed — SQuAD's normalization, extended to CJK punctuation.

**Tokens for F1**: every CJK character (Han, kana, Hangul) is a token of its own; any other run of
non-space characters is a word. So Chinese answers get character-level F1 (the CMRC/DRCD convention) and
English ones word-level F1, and mixed answers both. F1 is the harmonic mean of precision and recall of the
token multiset (``collections.Counter`` overlap); two empty answers score 1, one empty answer 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from typing import Any

__all__ = ["exact_match", "f1_tokens", "normalize_answer", "parse_choice", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = (
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FA1F),  # CJK extensions B–F, compatibility supplement
)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK)


def normalize_answer(text: str) -> str:
    """The normalized form compared by ``exact_match`` and split by ``f1_tokens`` (module docstring)."""
    text = unicodedata.normalize("NFKC", text.replace("<<", "<")).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_tokens(text: str) -> list[str]:
    """Tokens of a normalized answer: one per CJK character, one per other whitespace-free run."""
    tokens: list[str] = []
    for word in normalize_answer(text).split():
        run = ""
        for char in word:
            if _is_cjk(char):
                if run:
                    tokens.append(run)
                    run = ""
                tokens.append(char)
            else:
                run += char
        if run:
            tokens.append(run)
    return tokens


def exact_match(prediction: str | None, reference: str) -> bool:
    """Normalized equality; a missing prediction (None) never matches."""
    return prediction is not None and normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str | None, reference: str) -> float:
    """Token-level F1 (character-level for CJK) of normalized answers; None counts as an empty answer."""
    pred, ref = f1_tokens(prediction or ""), f1_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_choice(answer: str | None, options: Mapping[str, Any]) -> str | None:
    """The option key a generated answer names, or None when it names none (or several).

    Tried in order: the answer is a key (``"<option_2>"``); its normalized text equals exactly one option's
    text; exactly one key occurs in it (``"答案是<option_2>"``); exactly one option's text occurs in it.
    """
    if answer is None:
        return None
    text = answer.strip()
    if text in options:
        return text
    norm = normalize_answer(text)
    texts = {key: normalize_answer(str(value)) for key, value in options.items() if isinstance(value, str)}
    equal = [key for key, value in texts.items() if value and value == norm]
    if len(equal) == 1:
        return equal[0]
    named = [key for key in options if key in text]
    if len(named) == 1:
        return named[0]
    contained = [key for key, value in texts.items() if value and value in norm]
    return contained[0] if len(contained) == 1 else None
