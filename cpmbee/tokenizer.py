"""The CPM-Bee tokenizer.

CPM-Bee splits text by greedy longest match over a fixed vocabulary (no BPE merges): at each position the
longest vocabulary entry that the text starts with is taken, with entries up to 32 characters. Around that:

* ``"\\n"`` and ``" "`` are the vocabulary lines ``</n>`` and ``</_>`` (ids 4 and 5).
* ``<name>`` in text is one *special token*. A literal ``<`` is written ``<<`` (``escape``/``unescape``).
  An unterminated ``<``, or a ``<`` inside a special token, is a ``ValueError``.
* Characters that no vocabulary entry covers are grouped into maximal runs. Such a run, and a special token
  that is not in the vocabulary (``<mask_0>``, ``<option_3>``, …), get an id from a per-call *ext table*
  (``id >= vocab_size``, ``dict[id, text]``) that ``encode`` returns and ``decode`` takes back.

Ids are identical to the original implementation. One deliberate difference: the original gives a new ext
string the id ``vocab_size + len(table)``, which collides with an existing entry when the ``past_table``
passed in has gaps (``{86584: "A"}`` → the next string also gets 86584 and overwrites "A"). Here the new
string takes the original's number moved forward past ids already in the table (86585 in that example), so
ids are unchanged whenever the table has no gaps and never collide when it has.

Matching is a first-character index (for each character, the lengths of the entries starting with it,
longest first) over a plain dict, plus a cache of recently seen short strings; see ``benchmarks/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from transformers import PreTrainedTokenizer

__all__ = [
    "CpmBeeTokenizerBase",
    "EncodedText",
    "InvalidTokenIdError",
    "Piece",
    "Vocabulary",
    "escape",
    "unescape",
]

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

# Vocabulary lines that stand for whitespace characters.
_LINE_ENTRY, _SPACE_ENTRY = "</n>", "</_>"

# Piece kinds returned by `CpmBeeTokenizer.pieces`.
NORMAL, UNKNOWN, SPECIAL = 0, 1, 2

# Strings up to this length have their split cached (keys, prompts, option texts repeat a lot).
_CACHED_PART_LEN = 64


class Piece(NamedTuple):
    """One token of the split: its text, and whether it is a vocabulary piece, an unknown run or special."""

    text: str
    kind: int  # NORMAL, UNKNOWN or SPECIAL

    @property
    def is_unknown(self) -> bool:
        return self.kind == UNKNOWN

    @property
    def is_special(self) -> bool:
        return self.kind == SPECIAL


class EncodedText(NamedTuple):
    """``encode`` result: token ids and the ext table that gives the text of every id ``>= vocab_size``."""

    ids: list[int]
    ext_table: dict[int, str]


class Vocabulary(Protocol):
    """The vocabulary facts that collating prompts and decoding read. ``CpmBeeTokenizerBase`` has them all;
    ``cpmbee.generation.ConfigVocabulary`` gives them from a model's config when there is no tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def unk_id(self) -> int: ...
    @property
    def encoder(self) -> Mapping[str, int]: ...
    def decode(self, token_ids: Sequence[int], ext_table: Mapping[int, str] | None = None) -> str: ...


class InvalidTokenIdError(ValueError, KeyError):
    """An id that is neither in the vocabulary nor in the ext table given to ``decode``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def escape(text: str) -> str:
    """Make arbitrary text safe to embed in a CPM-Bee input: ``<`` becomes ``<<``."""
    return text.replace("<", "<<")


def unescape(text: str) -> str:
    return text.replace("<<", "<")


def load_vocab_lines(vocab_file: str | os.PathLike[str]) -> list[str]:
    """Vocabulary entries in id order (the file's non-empty lines, as the original reads them)."""
    with open(vocab_file, encoding="utf-8", newline=None) as f:
        lines = f.read().split("\n")
    return [line for line in lines if line]


def split_special(text: str) -> list[str]:
    """Split text into alternating parts: ``[plain, special, plain, special, …, plain]``.

    Plain parts have ``<<`` already turned into ``<``; special parts are whole ``<…>`` tokens. The list
    always has an odd length, so ``parts[1::2]`` are the special tokens.
    """
    if "<" not in text:
        return [text]
    parts: list[str] = []
    plain: list[str] = []
    n = len(text)
    i = 0
    while True:
        j = text.find("<", i)
        if j < 0:
            plain.append(text[i:])
            break
        plain.append(text[i:j])
        if j + 1 >= n:
            raise ValueError(f"Unexpected end of text `{text}`")
        if text[j + 1] == "<":  # escaped literal
            plain.append("<")
            i = j + 2
            continue
        # A special token: the character after `<` always belongs to it, then it runs to the next `>`.
        close = text.find(">", j + 2)
        nested = text.find("<", j + 2)
        if nested >= 0 and (close < 0 or nested < close):
            raise ValueError(f"Invalid special token at pos {nested}")
        if close < 0:
            raise ValueError(f"Unexpected end of text `{text}`")
        parts.append("".join(plain))
        parts.append(text[j : close + 1])
        plain = []
        i = close + 1
    parts.append("".join(plain))
    return parts


class _Matcher:
    """Greedy longest-match splitter over the non-special vocabulary entries.

    Entries of three or more characters are indexed by their first three (the lengths present, longest
    first); shorter ones are plain lookups. A position costs a handful of dict lookups instead of one per
    possible length.
    """

    def __init__(self, entries: Mapping[str, int]) -> None:
        self.ids = dict(entries)
        by_prefix: dict[str, set[int]] = {}
        for word in self.ids:
            if len(word) >= 3:
                by_prefix.setdefault(word[:3], set()).add(len(word))
        self.lengths = {p: tuple(sorted(lens, reverse=True)) for p, lens in by_prefix.items()}
        self.split_cached = lru_cache(maxsize=1 << 16)(self.split)

    def split(self, text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Ids and texts of the pieces; an unknown-character run has id ``-1``."""
        ids, lengths = self.ids, self.lengths
        out_ids: list[int] = []
        out_text: list[str] = []
        n = len(text)
        i = 0
        unk_start = -1
        while i < n:
            piece = None
            for size in lengths.get(text[i : i + 3], ()):
                if size <= n - i:
                    candidate = text[i : i + size]
                    if candidate in ids:
                        piece = candidate
                        break
            if piece is None:
                piece = text[i : i + 2]
                if len(piece) < 2 or piece not in ids:
                    piece = text[i]
                if piece not in ids:
                    if unk_start < 0:
                        unk_start = i
                    i += 1
                    continue
            if unk_start >= 0:
                out_ids.append(-1)
                out_text.append(text[unk_start:i])
                unk_start = -1
            out_ids.append(ids[piece])
            out_text.append(piece)
            i += len(piece)
        if unk_start >= 0:
            out_ids.append(-1)
            out_text.append(text[unk_start:])
        return tuple(out_ids), tuple(out_text)

    def __call__(self, text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return self.split_cached(text) if len(text) <= _CACHED_PART_LEN else self.split(text)


class CpmBeeTokenizerBase(PreTrainedTokenizer):
    """CPM-Bee text tokenizer over a ``vocab.txt`` (one entry per line, the line number is the id).

    The CPM-Bee calls:

    * ``encode(text, past_table=None) -> EncodedText(ids, ext_table)`` — ids with the ext table;
    * ``decode(ids, ext_table=None)`` — the inverse (special tokens verbatim, other ``<`` escaped as ``<<``);
      ``decode(encode(text))`` gives ``text`` back;
    * ``encode_into(text, ids, table, reverse)`` — ``encode`` appending to lists (the prompt encoder's hot
      path);
    * ``pieces(text)`` — the split itself.

    The ``transformers`` entry points (``tokenize``, ``convert_tokens_to_ids``) see plain token strings; there
    an unknown run maps to ``<unk>``, as no ext table travels with them. The class to load is
    ``cpmbee.CpmBeeTokenizer`` (``cpmbee.hf``), which adds calls on structured inputs and plain text.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike[str],
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        pad_token: str = "<pad>",
        padding_side: str = "left",
        **kwargs: Any,
    ) -> None:
        if not os.path.isfile(vocab_file):
            raise ValueError(f"vocab_file {str(vocab_file)!r} does not exist")
        self.vocab_file = str(vocab_file)
        self._lines = load_vocab_lines(vocab_file)
        encoder: dict[str, int] = {}
        for word in self._lines:
            encoder[word] = len(encoder)
        if len(encoder) != len(self._lines):
            raise ValueError(f"{vocab_file}: duplicate vocabulary entries")
        for entry, char in ((_LINE_ENTRY, "\n"), (_SPACE_ENTRY, " ")):
            if entry not in encoder:
                raise ValueError(f"{vocab_file}: a CPM-Bee vocabulary needs the entry {entry!r}")
            encoder[char] = encoder.pop(entry)
        self.encoder = encoder
        self.decoder = {i: w for w, i in encoder.items()}
        self.special_vocab = {w: i for w, i in encoder.items() if w.startswith("<") and w.endswith(">")}
        self._matcher = _Matcher({w: i for w, i in encoder.items() if w not in self.special_vocab})
        self.max_word_len = max(len(w) for w in encoder)
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            if str(token) not in encoder:
                raise ValueError(f"{vocab_file}: {name} {str(token)!r} is not in the vocabulary")
        super().__init__(  # type: ignore[no-untyped-call]
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            mask_token=mask_token,
            pad_token=pad_token,
            padding_side=padding_side,
            **kwargs,
        )

    # ------------------------------------------------------------------ sizes and fixed ids
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def bos_id(self) -> int:
        return self.encoder[str(self.bos_token)]

    @property
    def eos_id(self) -> int:
        return self.encoder[str(self.eos_token)]

    @property
    def unk_id(self) -> int:
        return self.encoder[str(self.unk_token)]

    @property
    def mask_id(self) -> int:
        return self.encoder[str(self.mask_token)]

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    # ------------------------------------------------------------------ CPM-Bee encoding
    def pieces(self, text: str) -> list[Piece]:
        """Split ``text`` into vocabulary pieces, unknown-character runs and special tokens."""
        out: list[Piece] = []
        for index, part in enumerate(split_special(text)):
            if index & 1:
                out.append(Piece(part, SPECIAL))
            elif part:
                ids, texts = self._matcher(part)
                out.extend(Piece(p, NORMAL if i >= 0 else UNKNOWN) for i, p in zip(ids, texts))
        return out

    def encode(
        self, text: str, past_table: Mapping[int, str] | None = None, *, add_special_tokens: bool = False
    ) -> EncodedText:
        """Token ids of ``text`` and the ext table for the ids ``>= vocab_size``.

        ``past_table`` (not modified) seeds the table, so strings seen before keep their ids; the returned
        table contains it plus the new entries. ``add_special_tokens`` is accepted for ``transformers``
        callers and changes nothing: CPM-Bee text has no special tokens around it (segments do, see
        ``cpmbee.prompt``).
        """
        table = dict(past_table) if past_table else {}
        reverse = {s: i for i, s in table.items()}
        ids: list[int] = []
        self.encode_into(text, ids, table, reverse)
        return EncodedText(ids, table)

    def encode_into(self, text: str, ids: list[int], table: dict[int, str], reverse: dict[str, int]) -> None:
        """Append the ids of ``text`` to ``ids``; a new ext string is added to ``table`` (id → text) and
        ``reverse`` (text → id) in place. ``encode`` without the copies, for callers encoding many strings
        into one sequence."""
        parts = split_special(text)
        matcher, special_vocab = self._matcher, self.special_vocab
        for index, part in enumerate(parts):
            if index & 1:
                token_id = special_vocab.get(part)
                if token_id is not None:
                    ids.append(token_id)
                else:
                    ids.append(self._ext_id(part, table, reverse))
            elif part:
                part_ids, texts = matcher(part)
                if -1 in part_ids:
                    ids.extend(
                        i if i >= 0 else self._ext_id(t, table, reverse) for i, t in zip(part_ids, texts)
                    )
                else:
                    ids.extend(part_ids)

    def _ext_id(self, text: str, table: dict[int, str], reverse: dict[str, int]) -> int:
        token_id = reverse.get(text)
        if token_id is None:
            token_id = self.vocab_size + len(reverse)
            while token_id in table:  # only when the caller's table has gaps (see module docstring)
                token_id += 1
            table[token_id] = text
            reverse[text] = token_id
        return token_id

    def decode(  # type: ignore[override]
        self,
        token_ids: int | Iterable[int] | Any,
        ext_table: Mapping[int, str] | bool | None = None,
        skip_special_tokens: bool = False,
        **kwargs: Any,
    ) -> str:
        """Text of ``token_ids``; ids ``>= vocab_size`` are looked up in ``ext_table``, negative ids skipped.

        Vocabulary special tokens come out verbatim; a literal ``<`` inside other pieces comes out as ``<<``,
        so the result can be fed back to ``encode``. With ``skip_special_tokens`` the vocabulary special
        tokens are dropped.
        """
        table: Mapping[int, str] = {}
        if isinstance(ext_table, bool):  # transformers-style positional `skip_special_tokens`
            skip_special_tokens = ext_table
        elif ext_table is not None:
            table = ext_table
        if isinstance(token_ids, EncodedText):  # decode(encode(text))
            if ext_table is not None and not isinstance(ext_table, bool):
                raise ValueError("decode: an EncodedText carries its own ext table; give no ext_table")
            table = token_ids.ext_table
            token_ids = token_ids.ids
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        ids: Iterable[Any] = [token_ids] if isinstance(token_ids, int) else token_ids
        out: list[str] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in table:
                out.append(table[token_id])
            elif token_id >= 0:
                word = self.decoder.get(token_id)
                if word is None:
                    raise InvalidTokenIdError(
                        f"token id {token_id} is not in the vocabulary (size {self.vocab_size}) "
                        f"nor in the ext table given to decode"
                    )
                if word in self.special_vocab:
                    if not skip_special_tokens:
                        out.append(word)
                else:
                    out.append(escape(word))
        return "".join(out)

    # ------------------------------------------------------------------ transformers plumbing
    def tokenize(self, text: str, **kwargs: Any) -> list[str]:  # type: ignore[override]
        return [p.text for p in self.pieces(text)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index, str(self.unk_token))

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return "".join(t if t in self.special_vocab else escape(t) for t in tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(self._lines) + "\n")
        return (path,)
