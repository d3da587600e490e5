"""ROUGE-1/2/L and BLEU-4 of generated answers, scored the way LLaMA-Factory scores them.

Per example: the texts are segmented into words with jieba (so Chinese is scored by words,
English by words and the spaces between them are dropped); ROUGE F-scores are those of the
`rouge_chinese` package on the space-joined words, BLEU-4 is nltk's sentence_bleu on the
characters with smoothing method 3. Each score is x100 and rounded to 4 places, then averaged.
ROUGE is computed here (a few lines) so that the `rouge_chinese` package is not needed; the
quirks that change numbers are kept: ROUGE-N counts *distinct* n-grams (sets), ROUGE-L is the
plain LCS over all words, and F = 2PR / (P + R + 1e-8).
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Iterable, Sequence

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _jieba():
    import jieba

    jieba.setLogLevel(logging.CRITICAL)  # it logs its dictionary loading otherwise
    return jieba


def segment(text: str) -> list[str]:
    """Words of `text` as rouge_chinese sees jieba's output joined by spaces."""
    joined = " ".join(_jieba().cut(text))
    words: list[str] = []
    for sentence in _cut_sentences(joined):
        if sentence:  # rouge_chinese drops empty sentences before normalising whitespace
            words.extend(" ".join(sentence.split()).split(" "))
    return words


def _cut_sentences(text: str) -> list[str]:
    """rouge_chinese's sentence split; it only matters through the words it produces."""
    text = re.sub(r"([。！？\?])([^”’])", r"\1\n\2", text)
    text = re.sub(r"(\.{6})([^”’])", r"\1\n\2", text)
    text = re.sub(r"(\…{2})([^”’])", r"\1\n\2", text)
    text = re.sub(r"([。！？\?][”’])([^，。！？\?])", r"\1\n\2", text)
    return text.rstrip().split("\n")


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def _ngram_set(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> float:
    """ROUGE-N F-score over distinct n-grams (rouge_chinese's default, exclusive=True)."""
    h, r = _ngram_set(hyp, n), _ngram_set(ref, n)
    return _f1(len(h & r), len(h), len(r))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> float:
    return _f1(lcs_length(ref, hyp), len(hyp), len(ref))


def bleu4(predict: str, label: str) -> float:
    """nltk sentence BLEU-4 on characters, smoothing method 3 (0..1)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    with warnings.catch_warnings():  # nltk warns on zero n-gram counts; the score is still right
        warnings.simplefilter("ignore")
        return float(sentence_bleu([list(label)], list(predict),
                                   smoothing_function=SmoothingFunction().method3))


def score_pair(predict: str, label: str) -> dict[str, float]:
    """All four scores of one example, x100 and rounded to 4 places like LLaMA-Factory."""
    hyp, ref = segment(predict), segment(label)
    if not "".join(hyp).strip() or not "".join(ref).strip():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}  # nothing to compare
    else:
        rouge = {"rouge-1": rouge_n(hyp, ref, 1), "rouge-2": rouge_n(hyp, ref, 2),
                 "rouge-l": rouge_l(hyp, ref)}
    scores = {k: round(v * 100, 4) for k, v in rouge.items()}
    scores["bleu-4"] = round(bleu4(predict, label) * 100, 4)
    return scores


def similarity_scores(predicts: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """Mean of each score over the examples; {} when there are none."""
    per_example = [score_pair(p, l) for p, l in zip(predicts, labels, strict=True)]
    if not per_example:
        return {}
    return {k: sum(s[k] for s in per_example) / len(per_example) for k in METRIC_KEYS}
