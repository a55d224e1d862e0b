"""CpmBeeTokenizer: golden conformance with the original, the ext-id collision fix, transformers plumbing."""

from __future__ import annotations

import random

import pytest

from cpmbee import CpmBeeTokenizer
from cpmbee.tokenizer import InvalidTokenIdError, escape, split_special, unescape

from .conftest import load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("tokenizer.json")


def _table(pairs):
    return None if pairs is None else {int(i): s for i, s in pairs}


def test_fixed_ids_match_golden(tokenizer, golden):
    assert tokenizer.vocab_size == golden["vocab_size"]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.mask_id) == (
        golden["bos_id"],
        golden["eos_id"],
        golden["unk_id"],
        golden["mask_id"],
    )
    assert tokenizer.max_word_len == golden["max_word_len"]
    assert sorted(tokenizer.special_vocab.items(), key=lambda kv: kv[1]) == [
        tuple(x) for x in golden["special_tokens"]
    ]
    assert (
        tokenizer.encoder["\n"] == golden["line_token_id"]
        and tokenizer.encoder[" "] == golden["space_token_id"]
    )


def test_encode_decode_pieces_match_golden(tokenizer, golden):
    for case in golden["encode"]:
        ids, table = tokenizer.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert list(table.items()) == [tuple(x) for x in case["ext_table"]], case["text"]
        assert tokenizer.decode(ids, table) == case["decoded"]
        pieces = [(p.text, p.is_unknown, p.is_special) for p in tokenizer.pieces(case["text"])]
        assert pieces == [(t, unk, special) for t, _start, unk, special in case["tokens"]], case["text"]


def test_invalid_text_raises_value_error_with_the_original_message(tokenizer, golden):
    for case in golden["invalid"]:
        with pytest.raises(ValueError) as err:
            tokenizer.encode(case["text"])
        assert str(err.value) == case["error"]["message"]


def test_decode_matches_golden(tokenizer, golden):
    for case in golden["decode"]:
        table = _table(case["ext_table"])
        if case["error"] is not None:
            with pytest.raises(KeyError):  # InvalidTokenIdError is both a KeyError and a ValueError
                tokenizer.decode(case["ids"], table)
            with pytest.raises(ValueError, match="not in the vocabulary"):
                tokenizer.decode(case["ids"], table)
        else:
            assert tokenizer.decode(case["ids"], table) == case["result"]


def test_encode_with_past_table(tokenizer, golden):
    """Contiguous past tables give the original's ids; a table with gaps no longer collides."""
    for case in golden["encode_with_past_table"]:
        past = _table(case["past_table"])
        before = dict(past)
        ids, table = tokenizer.encode(case["text"], past)
        assert past == before  # never mutated
        contiguous = sorted(past) == list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(past)))
        if contiguous:
            assert ids == case["ids"] and list(table.items()) == [tuple(x) for x in case["ext_table"]]
        else:
            # The original reuses vocab_size + len(table) = an id already in the table and overwrites it.
            assert all(table[i] == s for i, s in past.items()), "past entries must survive"
            assert len(set(table)) == len(table) and len(set(table.values())) == len(table)
            assert tokenizer.decode(ids, table) == case["text"]
            assert ids != case["ids"]  # the documented difference


def test_collision_fix_allocates_past_the_gap(tokenizer):
    v = tokenizer.vocab_size
    ids, table = tokenizer.encode("😀 and 🤗", {v + 1: "A"})
    assert table == {v + 1: "A", v + 2: "😀", v + 3: "🤗"}
    assert tokenizer.decode(ids, table) == "😀 and 🤗"


def test_split_special_states():
    assert split_special("a<<b") == ["a<b"]
    assert split_special("x<mask_0>y<s>") == ["x", "<mask_0>", "y", "<s>", ""]
    assert split_special("<>>") == ["", "<>>", ""]  # the character after '<' always opens the token
    with pytest.raises(ValueError, match="pos 2"):
        split_special("<a<b>")


def test_escape_roundtrip_on_random_text(tokenizer):
    rng = random.Random(7)
    alphabet = [*list("ab <>\n\t中文天气😀é"), "<mask_1>", "<<"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        safe = escape(text)
        ids, table = tokenizer.encode(safe)
        assert tokenizer.decode(ids, table) == safe
        assert unescape(safe) == text


def _naive_split(vocab, text):
    """Independent oracle: longest vocabulary match at each position, unknown characters merged."""
    out, i, unk = [], 0, ""
    while i < len(text):
        best = next((text[i:j] for j in range(len(text), i, -1) if text[i:j] in vocab), None)
        if best is None:
            unk += text[i]
            i += 1
            continue
        if unk:
            out.append(unk)
            unk = ""
        out.append(best)
        i += len(best)
    return out + ([unk] if unk else [])


def test_greedy_longest_match_against_oracle(tiny_tokenizer):
    vocab = {w for w in tiny_tokenizer.encoder if w not in tiny_tokenizer.special_vocab}
    rng = random.Random(3)
    alphabet = [*list("theanis input今天气不错中国北京xyZ😀 "), "the", "今天", "北京"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert [p.text for p in tiny_tokenizer.pieces(text)] == _naive_split(vocab, text)


def test_transformers_api(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from cpmbee.prompt import encode_prompt, plain_text_input

    enc = tokenizer("今天天气不错")  # plain text: the ids of the plain-text layout
    assert enc["input_ids"] == encode_prompt(tokenizer, plain_text_input("今天天气不错")).ids.tolist()
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert tokenizer.decode(tokenizer.encode("今天天气不错")) == "今天天气不错"
    assert tokenizer.convert_tokens_to_ids("😀") == tokenizer.unk_id  # no ext table on this path
    assert tokenizer.decode([6, 40, 7], skip_special_tokens=True) == "<<"
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")[4] == "</n>"
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, CpmBeeTokenizer)
    assert again.encode("今天 is\n<mask_3>").ids == tokenizer.encode("今天 is\n<mask_3>").ids
    assert again.padding_side == "left"


def test_bad_vocab_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CpmBeeTokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("<pad>\n<unk>\n<s>\n</s>\n", encoding="utf-8")
    with pytest.raises(ValueError, match="</n>"):
        CpmBeeTokenizer(bad)


def test_decode_unknown_id_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(InvalidTokenIdError, match="not in the vocabulary"):
        tiny_tokenizer.decode([10_000])


def test_call_with_structured_input(tokenizer):
    import torch

    from cpmbee.prompt import collate_prompts, encode_prompt

    data = [{"input": "今天天气不错", "<ans>": ""}, {"q": "<mask_0>", "<ans>": {"<mask_0>": ""}}]
    enc = tokenizer(data, return_tensors="pt")
    expected = collate_prompts(tokenizer, [encode_prompt(tokenizer, d) for d in data]).model_inputs()
    assert set(enc) == set(expected) and all(torch.equal(enc[k], expected[k]) for k in expected)
    assert enc.prompt_batch.answer_paths == [[()], [("<mask_0>",)]]
    assert tokenizer(data[0])["input_ids"] == [
        expected["input_ids"][0][expected["num_segments"][0] > 0].tolist()
    ]
    with pytest.raises(ValueError, match="no '<ans>' key"):
        tokenizer({"input": "x"})
