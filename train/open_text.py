"""Open-vocabulary training text for the demo model, English and Hindi.

Words come from `wordfreq`'s frequency-ranked lists (the most frequent 20,000 English words and
15,000 Devanagari Hindi words, after filtering), drawn with probability proportional to
rank**-0.5: flatter than real usage, so that a word of rank 15,000 is still spoken a few dozen
times in a training set, while function words stay the most common. A sentence is one of:

- a random run of 3-12 such words (most of the set: the model has to spell what it hears,
  not predict a grammar);
- a sentence frame ("can you {w} the {w}", "मुझे {w} चाहिए", ...) with frequency-drawn words
  in its slots (function-word contexts as in real speech);
- a sentence of the earlier closed grammar (train/synth_data.py: numbers, dates, times), so
  the model keeps reading numbers the way the examples say them.

Held out: the unseen evaluation sentences (train/unseen/*.txt) never appear, and neither does
any training sentence that shares a word trigram with one of them, or a word bigram whose
words are not both among the 100 most frequent (words in their evaluation context are never
heard in training; the words themselves may be). The dev split (validation during training)
is drawn the same way and is absent from training.

Output: one JSON object per line {"split": "train"|"dev", "lang", "text"}.

  python train/open_text.py --out data/open_text.jsonl --train-per-lang 30000 --dev-per-lang 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from synth_data import en_sentence, hi_sentence, normalize_text  # noqa: E402

VOCAB = {"en": 20000, "hi": 15000}
# wordfreq tokens eSpeak expands into other words ("dr" is read "doctor"): their audio would
# teach the wrong spelling
EN_SKIP = {"etc", "vs", "mr", "mrs", "ms", "dr", "jr", "sr", "st", "tv", "ok", "pm", "am", "eg", "ie", "lol"}
EN_WORD = re.compile(r"[a-z]+('[a-z]+)?")
HI_WORD = re.compile(r"[\u0900-\u0963\u0971-\u097f]+")  # Devanagari letters and signs, no digits or danda

EN_FRAMES = [
    "the {w} {w}", "i {w} the {w}", "can you {w} the {w}", "please {w} {w} {w}", "we have to {w} {w}",
    "it is {w} {w}", "there is a {w} in the {w}", "do you {w} {w}", "i want to {w} {w}",
    "she said the {w} was {w}", "they {w} to the {w}", "my {w} is {w}", "he {w} a {w} {w}",
    "what is the {w}", "how do you {w} {w}", "this is {w} {w}", "we {w} {w} and {w}",
    "i think the {w} {w} {w}", "let me {w} the {w}", "you should {w} {w}", "where is the {w}",
    "a {w} of {w}", "on the {w} {w}", "before the {w} {w}", "after {w} we {w}",
    "i will {w} it {w}", "could you {w} {w} {w}", "the {w} is {w} than the {w}", "why did you {w} {w}",
]
HI_FRAMES = [
    "{w} {w} है", "मुझे {w} चाहिए", "क्या आप {w} {w} हैं", "यह {w} बहुत {w} है", "हम {w} में {w}",
    "{w} को {w} करना है", "वह {w} से {w} गया", "मेरा {w} {w} है", "आज {w} {w} था", "कृपया {w} {w}",
    "{w} के लिए {w} है", "{w} और {w} {w} हैं", "उसने {w} {w} दिया", "मैं {w} {w} रहा हूं",
    "{w} की {w} बहुत {w} है", "कल {w} {w} होगा", "{w} में {w} नहीं है", "आप {w} {w} सकते हैं",
    "हमें {w} {w} चाहिए", "{w} पर {w} {w} थी", "उनके {w} का {w}", "{w} ने {w} को {w}",
]


def vocabulary(lang: str) -> list[str]:
    """The most frequent words of a language that eSpeak reads as written, most frequent first."""
    import wordfreq
    out, seen = [], set()
    for w in wordfreq.top_n_list(lang, 80000):
        w = unicodedata.normalize("NFC", w)
        if lang == "en":
            ok = (EN_WORD.fullmatch(w) is not None and w not in EN_SKIP
                  and (len(w) > 1 or w in ("a", "i")) and re.search(r"[aeiouy]", w) is not None)
        else:
            ok = HI_WORD.fullmatch(w) is not None
        if ok and w not in seen:
            seen.add(w)
            out.append(w)
            if len(out) == VOCAB[lang]:
                break
    return out


def read_unseen(lang: str) -> list[str]:
    with open(os.path.join(HERE, "unseen", f"{lang}.txt"), encoding="utf-8") as f:
        return [normalize_text(line) for line in f if line.strip()]


def held_out_contexts(sentences: list[str], common: set[str]) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for s in sentences:
        w = s.split()
        grams.update(tuple(w[i:i + 3]) for i in range(len(w) - 2))
        grams.update((a, b) for a, b in zip(w, w[1:]) if not (a in common and b in common))
    return grams


def touches(sentence: str, grams: set[tuple[str, ...]]) -> bool:
    w = sentence.split()
    return any((a, b) in grams for a, b in zip(w, w[1:])) or \
        any(tuple(w[i:i + 3]) in grams for i in range(len(w) - 2))


class Sampler:
    def __init__(self, words: list[str], rng: random.Random):
        self.words = words
        self.rng = rng
        self.weights = [(r + 1) ** -0.5 for r in range(len(words))]
        acc, cum = 0.0, []
        for x in self.weights:
            acc += x
            cum.append(acc)
        self.cum = cum

    def word(self) -> str:
        return self.rng.choices(self.words, cum_weights=self.cum, k=1)[0]


def sentence(lang: str, rng: random.Random, sampler: Sampler) -> str:
    kind = rng.random()
    if kind < 0.6:
        return " ".join(sampler.word() for _ in range(rng.randint(3, 12)))
    if kind < 0.85:
        frame = rng.choice(EN_FRAMES if lang == "en" else HI_FRAMES)
        parts = frame.split("{w}")
        out = parts[0]
        for p in parts[1:]:
            out += sampler.word() + p
        return out
    return (en_sentence if lang == "en" else hi_sentence)(rng)


def make(lang: str, n_train: int, n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(f"{seed}-{lang}")
    words = vocabulary(lang)
    sampler = Sampler(words, rng)
    unseen = read_unseen(lang)
    grams = held_out_contexts(unseen, set(words[:100]))
    banned = set(unseen)
    dev: list[str] = []
    train: list[str] = []
    while len(dev) < n_dev:
        s = normalize_text(sentence(lang, rng, sampler))
        if len(s.split()) >= 3 and s not in banned and not touches(s, grams):
            banned.add(s)
            dev.append(s)
    while len(train) < n_train:
        s = normalize_text(sentence(lang, rng, sampler))
        if s and s not in banned and not touches(s, grams):
            train.append(s)
    return train, dev


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-per-lang", type=int, default=30000)
    ap.add_argument("--dev-per-lang", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for lang in ("en", "hi"):
            train, dev = make(lang, args.train_per_lang, args.dev_per_lang, args.seed)
            for split, texts in (("dev", dev), ("train", train)):
                for t in texts:
                    f.write(json.dumps({"split": split, "lang": lang, "text": t}, ensure_ascii=False) + "\n")
            n_words = len({w for t in train for w in t.split()})
            print(f"{lang}: {len(train)} train, {len(dev)} dev sentences, {n_words} distinct words", file=sys.stderr)


if __name__ == "__main__":
    main()
