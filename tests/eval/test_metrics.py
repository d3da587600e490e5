"""Generation metrics against hand-computed values (LLaMA-Factory's ComputeSimilarity)."""

import math

import pytest

from tuneforge.eval.metrics import score_pair, segment, similarity_scores


def _f1(p, r):
    return 2 * p * r / (p + r + 1e-8)


def test_english_pair_by_hand():
    predict, label = "the cat sat on the mat", "the cat is on the mat"
    assert segment(predict) == ["the", "cat", "sat", "on", "the", "mat"]
    s = score_pair(predict, label)
    # distinct unigrams: 5 and 5, shared {the, cat, on, mat} = 4
    assert s["rouge-1"] == round(_f1(4 / 5, 4 / 5) * 100, 4) == 80.0
    # distinct bigrams: 5 and 5, shared {the cat, on the, the mat} = 3
    assert s["rouge-2"] == 60.0
    # LCS "the cat on the mat" = 5 words of 6 and 6
    assert s["rouge-l"] == round(_f1(5 / 6, 5 / 6) * 100, 4) == 83.3333
    # characters (22 vs 21, so no brevity penalty): clipped n-gram matches / hypothesis n-grams
    precisions = [20 / 22, 17 / 21, 15 / 20, 13 / 19]
    bleu = math.exp(sum(math.log(p) for p in precisions) / 4)
    assert s["bleu-4"] == round(bleu * 100, 4)


def test_chinese_pair_by_hand():
    predict, label = "今天天气很好。", "今天天气不错。"
    assert segment(predict) == ["今天天气", "很", "好", "。"]
    assert segment(label) == ["今天天气", "不错", "。"]
    s = score_pair(predict, label)
    # words: 4 and 3 distinct, shared {今天天气, 。} = 2
    assert s["rouge-1"] == round(_f1(2 / 4, 2 / 3) * 100, 4) == 57.1429
    assert s["rouge-2"] == 0.0  # no shared bigram of words
    assert s["rouge-l"] == 57.1429  # LCS = 今天天气 。
    # characters, 7 and 7: 1-grams 5/7 (今 天 天 气 。), 2-grams 3/6 (今天 天天 天气),
    # 3-grams 2/5 (今天天 天天气), 4-grams 1/4 (今天天气) -> (1/28) ** (1/4)
    assert s["bleu-4"] == round((5 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25 * 100, 4) == 43.4721


@pytest.mark.parametrize("text", ["the cat sat on the mat", "今天天气很好，我们去公园散步。"])
def test_identical_is_100(text):
    assert score_pair(text, text) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                      "bleu-4": 100.0}


def test_disjoint_is_0():
    assert set(score_pair("hello", "你好").values()) == {0.0}


@pytest.mark.parametrize("predict,label", [("", "an answer"), ("an answer", ""), ("", ""),
                                           ("   ", "x")])
def test_empty_scores_0(predict, label):
    assert set(score_pair(predict, label).values()) == {0.0}


def test_average_over_examples():
    avg = similarity_scores(["the cat sat on the mat", "hello"], ["the cat is on the mat", "你好"])
    assert avg["rouge-1"] == pytest.approx(40.0)
    assert similarity_scores([], []) == {}


def test_same_as_rouge_chinese():
    import jieba
    import rouge_chinese

    pairs = [("今天天气很好！我们去公园。", "天气不错？去公园吧……好的"),
             ("The answer is 42. Really?", "the answer is forty two"),
             ("a\n \nb c a b", "a b c\n\na")]
    for predict, label in pairs:
        hyp, ref = " ".join(jieba.cut(predict)), " ".join(jieba.cut(label))
        expected = rouge_chinese.Rouge().get_scores(hyp, ref)[0]
        got = score_pair(predict, label)
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            assert got[key] == round(expected[key]["f"] * 100, 4)
