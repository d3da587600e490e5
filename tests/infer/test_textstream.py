"""Streaming detokenization with stop strings, against decoding the whole answer at once."""

from __future__ import annotations

import random

import pytest

from tuneforge.infer.textstream import TextAssembler

TEXTS = [
    "Hello there! How are you today? I'm fine, thanks.",
    "Les élèves étudient à l'école; 学生们在学校学习。 Ünïcödé ✓ 🚀🚀 done",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))",
    "   leading spaces,\ttabs\tand  double  spaces  ",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _run(tokenizer, ids, stops):
    asm = TextAssembler(tokenizer, stops)
    pieces = []
    for token in ids:
        pieces.append(asm.add(token))
        if asm.stopped:
            break
    pieces.append(asm.finish())
    return asm, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.insert(len(ids) // 2, tokenizer.eos_token_id)  # a special token mid-answer is skipped
    asm, pieces = _run(tokenizer, ids, [])
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole == asm.text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert sum(1 for p in pieces[:-1] if p) > len(ids) // 3  # it streamed, not all at the end


def test_random_token_soup_matches_the_whole_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        asm, pieces = _run(tokenizer, ids, [])
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text,stops", [
    ("Hello there! How are you today? I'm fine.", ["How"]),
    ("Hello there! How are you today? I'm fine.", ["you to", "are"]),        # the earliest wins
    ("Hello there! How are you today? I'm fine.", ["nowhere", "fine."]),
    ("Les élèves étudient à l'école; 学生们在学校学习。", ["学校"]),
    ("Les élèves étudient à l'école; 学生们在学校学习。", ["é"]),
    ("one\n\ntwo\n\nthree", ["\n\n"]),
    ("one two three", ["xyz"]),                                                 # never seen
])
def test_stop_strings_cut_the_answer_and_are_never_sent(tokenizer, text, stops):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    asm, pieces = _run(tokenizer, ids, stops)
    cuts = [text.find(s) for s in stops if s in text]
    expected = text[:min(cuts)] if cuts else text
    assert "".join(pieces) == expected == asm.text
    assert asm.stopped == bool(cuts)
    if cuts:  # it stopped at the token that completed a stop string, not later
        first = next(k for k in range(1, len(ids) + 1)
                     if any(s in tokenizer.decode(ids[:k]) for s in stops))
        assert len(asm.ids) == first
