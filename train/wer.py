"""Word error rate: word-level edit distance over reference words, per language."""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """NFC, lower case, punctuation (but the apostrophe) to spaces, single spaces."""
    text = unicodedata.normalize("NFC", text).lower()
    out = [ch if ch == "'" or unicodedata.category(ch)[0] in "LMN" else " " for ch in text]
    return " ".join("".join(out).split())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    errors = words = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize(r).split(), normalize(h).split()
        errors += edit_distance(rw, hw)
        words += len(rw)
    return errors / max(words, 1)


def wer_by_lang(refs: list[str], hyps: list[str], langs: list[str]) -> dict[str, float]:
    out = {}
    for lang in sorted(set(langs)):
        idx = [i for i, l in enumerate(langs) if l == lang]
        out[lang] = round(wer([refs[i] for i in idx], [hyps[i] for i in idx]), 4)
    return out
