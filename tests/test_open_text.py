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


def _unseen_vocabulary(lang):
    words = []
    for s in open_text.read_unseen(lang):
        words += [w for w in s.split() if w not in words]
    return words


@pytest.mark.parametrize("lang", ["en", "hi"])
def test_mix_shares_hold_after_the_filter(lang, monkeypatch):
    # the evaluation sentences' own words as the vocabulary: the filter rejects many drawn
    # sentences, and a rejected one is redrawn in its own kind, so the shares still hold
    monkeypatch.setattr(open_text, "vocabulary", lambda _lang: _unseen_vocabulary(lang))
    mix = open_text.parse_mix("everyday=0.5,loose=0.1,runs=0.25,grammar=0.15")
    corpus = open_text.generate(lang, n_train=4000, n_dev=40, seed=3, mix=mix)
    shares = corpus.shares()
    for kind in open_text.KINDS:
        assert abs(shares[kind] - mix[kind]) < 0.03, (kind, shares)
    texts = [t for _, t in corpus.train]
    assert len(set(texts)) == len(texts)                     # training sentences are distinct
    only = open_text.generate(lang, n_train=300, n_dev=5, seed=3, mix=open_text.parse_mix("runs=1"))
    assert {k for k, _ in only.train} == {"runs"}


def test_default_mix_is_mostly_sentences_in_english():
    en = open_text.parse_mix(open_text.DEFAULT_MIX["en"])
    hi = open_text.parse_mix(open_text.DEFAULT_MIX["hi"])
    assert abs(sum(en.values()) - 1) < 1e-9 and abs(sum(hi.values()) - 1) < 1e-9
    assert en["everyday"] > en["runs"] and en["grammar"] > 0 and hi["grammar"] > 0
    with pytest.raises(ValueError):
        open_text.parse_mix("sentences=1")
    with pytest.raises(ValueError):
        open_text.parse_mix("runs=0,grammar=0")


@pytest.mark.parametrize("lang", ["en", "hi"])
def test_same_seed_same_text(lang, monkeypatch):
    monkeypatch.setattr(open_text, "vocabulary", lambda _lang: _unseen_vocabulary(lang))
    a = open_text.make(lang, n_train=500, n_dev=20, seed=11)
    b = open_text.make(lang, n_train=500, n_dev=20, seed=11)
    c = open_text.make(lang, n_train=500, n_dev=20, seed=12)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_cli_writes_the_format_synth_data_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(open_text, "vocabulary", _unseen_vocabulary)
    out = tmp_path / "texts.jsonl"
    open_text.main(["--out", str(out), "--train-per-lang", "200", "--dev-per-lang", "10",
                    "--mix-en", "everyday=1", "--mix-hi", "runs=1"])
    import json
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    count = {}
    for r in rows:
        assert set(r) == {"split", "lang", "text"} and r["text"] == open_text.normalize_text(r["text"])
        count[(r["split"], r["lang"])] = count.get((r["split"], r["lang"]), 0) + 1
    assert count == {("dev", "en"): 10, ("train", "en"): 200, ("dev", "hi"): 10, ("train", "hi"): 200}


@pytest.mark.parametrize("lang", ["en", "hi"])
def test_everyday_frames_fill_every_slot(lang):
    import random
    import everyday_text
    rng = random.Random(5)
    fillers = everyday_text.Fillers(lang, rng, word=lambda: "zebra", noun=lambda: None, gerund=lambda: None,
                                    number=lambda: "seven", clock=lambda: "nine")
    for frame in fillers.frames:
        assert set(everyday_text.SLOT.findall(frame)) <= set(fillers.slots), frame
        s = fillers.fill(frame)
        assert "{" not in s and "}" not in s and s == " ".join(s.split()), s
    if lang == "en":
        # every verb phrase starts with a verb whose forms are written out
        for p in everyday_text.EN_VERB_PHRASES:
            assert p.split()[0] in everyday_text.EN_VERB_FORMS, p
        assert everyday_text.en_inflect("go for a walk", 1) == "went for a walk"
        assert everyday_text.en_inflect("stop the car here", 2) == "stopping the car here"
        assert [everyday_text.en_plural(n) for n in ("cup", "box", "battery", "knife", "key")] == \
            ["cups", "boxes", "batteries", "knives", "keys"]


@pytest.mark.parametrize("lang", ["en", "hi"])
def test_everyday_words_are_known_to_the_shipped_tokenizer(lang):
    # the GPU call continues from the shipped package (--init-from) with its tokenizer: a
    # character it lacks would train as <unk>
    import random
    import everyday_text
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece reads the shipped tokenizer")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(ROOT, "engines", "assets", "demo", "tokenizer.model"))
    rng = random.Random(9)
    fillers = everyday_text.Fillers(lang, rng, word=lambda: "a", noun=lambda: None, gerund=lambda: None,
                                    number=lambda: "one", clock=lambda: "two")
    words = {w for _ in range(3000) for w in open_text.normalize_text(fillers.sentence()).split()}
    assert len(words) > 200
    assert not [w for w in words if sp.unk_id() in sp.encode(w)]
