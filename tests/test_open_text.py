"""train/open_text.py keeps the unseen evaluation set unseen: no training or dev sentence is an
evaluation sentence or shares a word trigram, or a bigram not made of two very common words,
with one. Checked with a vocabulary made of the evaluation sentences' own words (wordfreq is a
training-only dependency), so that the generator produces such contexts all the time and the
filter has to remove them."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
import open_text  # noqa: E402


@pytest.mark.parametrize("lang", ["en", "hi"])
def test_training_text_never_holds_an_unseen_context(lang, monkeypatch):
    unseen = open_text.read_unseen(lang)
    words = []
    for s in unseen:
        words += [w for w in s.split() if w not in words]
    monkeypatch.setattr(open_text, "vocabulary", lambda _lang: words)
    train, dev = open_text.make(lang, n_train=3000, n_dev=50, seed=7)
    common = set(words[:100])
    grams = open_text.held_out_contexts(unseen, common)
    # the filter had work to do: the unfiltered generator reproduces evaluation contexts
    assert any(len(g) == 2 for g in grams) and any(len(g) == 3 for g in grams)
    for s in train + dev:
        w = s.split()
        assert s not in unseen
        assert not any(tuple(w[i:i + 3]) in grams for i in range(len(w) - 2)), s
        assert not any((a, b) in grams for a, b in zip(w, w[1:])), s
    assert not set(dev) & set(train)
    assert len({w for s in train for w in s.split()} & set(words)) > len(words) // 2


def test_filter_catches_a_shared_context():
    grams = open_text.held_out_contexts(["turn left after the second traffic light"], {"the", "after"})
    assert open_text.touches("please take the second traffic jam", grams)      # trigram
    assert open_text.touches("a traffic light", grams)                         # rare bigram
    assert not open_text.touches("after the party", grams)                     # common bigram only
