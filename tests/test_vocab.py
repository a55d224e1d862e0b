"""`cpmbee build-vocab`: CPM-Bee layout, loads, covers the corpus."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cpmbee import CpmBeeTokenizer
from cpmbee.__main__ import cli
from cpmbee.data.vocab import SPECIAL_TOKENS, build_vocab

CORPUS = [
    {"input": "今天天气不错，我们去公园散步。", "prompt": "续写", "<ans>": "公园里的花开了。"},
    {"input": "北京是中国的首都", "prompt": "中翻英", "<ans>": "Beijing is the capital of China"},
    {"input": "The weather is nice today, let us walk in the park.", "<ans>": "今天天气很好<mask_0>"},
    {"text": "x << 2 is shifting; the park is green and the weather is nice."},
]


def test_build_vocab_layout_and_coverage(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in CORPUS * 3) + "\n", encoding="utf-8"
    )
    out = tmp_path / "vocab.txt"
    result = CliRunner().invoke(cli, ["build-vocab", str(corpus), "-o", str(out), "--size", "300"])
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert lines[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and len(lines) == len(set(lines)) <= 300
    assert (
        "<eod>" in lines and "<mask_0>" not in lines and "<mask" not in "".join(lines[len(SPECIAL_TOKENS) :])
    )
    tok = CpmBeeTokenizer(out)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (6, 7, 1, 2)
    for record in CORPUS:
        for text in record.values():
            ids, table = tok.encode(
                text if "<mask_0>" in text else text.replace("<<", "<").replace("<", "<<")
            )
            assert all(t.startswith("<") for t in table.values()), table  # every corpus character is covered
            assert tok.decode(ids, table) == (
                text if "<mask_0>" in text else text.replace("<<", "<").replace("<", "<<")
            )
    english = [p.text for p in tok.pieces("the weather is nice")]
    assert len(english) < len("the weather is nice") / 2  # learned pieces, not letters
    assert [p.text for p in tok.pieces("天气")] == ["天", "气"]  # CJK stays character-level


def test_build_vocab_budget_errors(tmp_path):
    assert len(build_vocab(["abc 天"] * 5, vocab_size=200)) <= 200
    result = CliRunner().invoke(cli, ["build-vocab", __file__, "-o", str(tmp_path / "v.txt"), "--size", "10"])
    assert result.exit_code != 0 and "vocab_size must be at least" in result.output
