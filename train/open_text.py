"""Open-vocabulary training text for the demo model, English and Hindi.

Words come from `wordfreq`'s frequency-ranked lists (the most frequent 20,000 English words and
15,000 Devanagari Hindi words, after filtering), drawn with probability proportional to
rank**-0.5: flatter than real usage, so that a word of rank 15,000 is still spoken a few dozen
times in a training set, while function words stay the most common. A sentence is one of four
kinds, in shares set per language (--mix-en, --mix-hi; DEFAULT_MIX):

- everyday: a sentence of everyday speech (train/everyday_text.py: requests, questions and
  statements about time, places, work, family, travel, shopping, weather, ...) with its slots
  filled from hand-written lists of the right kind and, in noun-ish and "mention" slots, from
  the frequency-ranked words: word order and word boundaries as people speak;
- loose: a loose frame ("can you {w} the {w}", "मुझे {w} चाहिए", ...) with frequency-drawn
  words in all its slots (function-word contexts around any word);
- runs: a random run of 3-12 frequency-drawn words (the model has to spell what it hears, not
  predict a grammar);
- grammar: a sentence of the earlier closed grammar (train/synth_data.py: numbers, dates,
  times), so the model keeps reading numbers the way the examples say them.

The kind is drawn first and a rejected sentence (below) is redrawn in the same kind, so the
shares hold in the output. Training sentences are distinct.

Held out: the unseen evaluation sentences (train/unseen/*.txt) never appear, and neither does
any training sentence that shares a word trigram with one of them, or a word bigram whose
words are not both among the 100 most frequent (words in their evaluation context are never
heard in training; the words themselves may be). The dev split (validation during training)
is drawn the same way and is absent from training.

Output: one JSON object per line {"split": "train"|"dev", "lang", "text"}.

  python train/open_text.py --out data/open_text.jsonl --train-per-lang 25000 --dev-per-lang 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import everyday_text  # noqa: E402
from synth_data import en_number, en_sentence, en_time, hi_number, hi_sentence, normalize_text  # noqa: E402

VOCAB = {"en": 20000, "hi": 15000}
# wordfreq tokens eSpeak expands into other words ("dr" is read "doctor"): their audio would
# teach the wrong spelling
EN_SKIP = {"etc", "vs", "mr", "mrs", "ms", "dr", "jr", "sr", "st", "tv", "ok", "pm", "am", "eg", "ie", "lol"}
EN_WORD = re.compile(r"[a-z]+('[a-z]+)?")
HI_WORD = re.compile(r"[\u0900-\u0963\u0971-\u097f]+")  # Devanagari letters and signs, no digits or danda

KINDS = ("everyday", "loose", "runs", "grammar")
# English: mostly sentences, since its errors are word boundaries and spellings of words in
# context. Hindi met its target on the word-run mix, so it keeps a larger share of runs.
DEFAULT_MIX = {"en": "everyday=0.6,loose=0.1,runs=0.15,grammar=0.15",
               "hi": "everyday=0.4,loose=0.1,runs=0.35,grammar=0.15"}
MAX_TRIES = 1000  # redraws of one kind before giving up: a kind the filter always rejects

LOOSE_EN = [
    "the {w} {w}", "i {w} the {w}", "can you {w} the {w}", "please {w} {w} {w}", "we have to {w} {w}",
    "it is {w} {w}", "there is a {w} in the {w}", "do you {w} {w}", "i want to {w} {w}",
    "she said the {w} was {w}", "they {w} to the {w}", "my {w} is {w}", "he {w} a {w} {w}",
    "what is the {w}", "how do you {w} {w}", "this is {w} {w}", "we {w} {w} and {w}",
    "i think the {w} {w} {w}", "let me {w} the {w}", "you should {w} {w}", "where is the {w}",
    "a {w} of {w}", "on the {w} {w}", "before the {w} {w}", "after {w} we {w}",
    "i will {w} it {w}", "could you {w} {w} {w}", "the {w} is {w} than the {w}", "why did you {w} {w}",
]
LOOSE_HI = [
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


def parse_mix(text: str) -> dict[str, float]:
    """"everyday=0.6,runs=0.25,..." -> the share of each kind (normalized; missing kinds 0)."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in mix:
            raise ValueError(f"bad mix entry {part!r}: expected KIND=SHARE with KIND one of {', '.join(KINDS)}")
        mix[kind] = float(value)
        if mix[kind] < 0:
            raise ValueError(f"negative share in {part!r}")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"mix {text!r} has no positive share")
    return {k: v / total for k, v in mix.items()}


class Sampler:
    """Draws from a frequency-ranked list with probability proportional to rank**-0.5."""

    def __init__(self, words: list[str], rng: random.Random):
        self.words = words
        self.rng = rng
        acc, cum = 0.0, []
        for r in range(len(words)):
            acc += (r + 1) ** -0.5
            cum.append(acc)
        self.cum = cum

    def word(self) -> str:
        return self.rng.choices(self.words, cum_weights=self.cum, k=1)[0]

    def maybe(self) -> str | None:
        return self.word() if self.words else None


@dataclass
class Generator:
    """Draws sentences of one language, kind by kind, from one seeded RNG."""

    lang: str
    rng: random.Random
    words: list[str]

    def __post_init__(self):
        self.sampler = Sampler(self.words, self.rng)
        nouns = Sampler(everyday_text.en_noun_like(self.words) if self.lang == "en" else [], self.rng)
        gerunds = Sampler(everyday_text.en_gerund_like(self.words) if self.lang == "en" else [], self.rng)
        rng = self.rng
        if self.lang == "en":
            def number() -> str:
                return en_number(rng.choice([rng.randint(2, 12), rng.randint(2, 12), rng.randint(13, 99)]))

            def clock() -> str:
                return en_time(rng)
        else:
            def number() -> str:
                return hi_number(rng)

            def clock() -> str:
                return rng.choice(everyday_text.HI_CLOCK)
        self.fillers = everyday_text.Fillers(self.lang, rng, self.sampler.word, nouns.maybe, gerunds.maybe,
                                             number, clock)

    def sentence(self, kind: str) -> str:
        rng = self.rng
        if kind == "everyday":
            return self.fillers.sentence()
        if kind == "runs":
            return " ".join(self.sampler.word() for _ in range(rng.randint(3, 12)))
        if kind == "loose":
            frame = rng.choice(LOOSE_EN if self.lang == "en" else LOOSE_HI)
            parts = frame.split("{w}")
            out = parts[0]
            for p in parts[1:]:
                out += self.sampler.word() + p
            return out
        if kind == "grammar":
            return (en_sentence if self.lang == "en" else hi_sentence)(rng)
        raise ValueError(kind)


@dataclass
class Corpus:
    """One language's sentences with the kind each was drawn as."""

    train: list[tuple[str, str]]   # (kind, text)
    dev: list[tuple[str, str]]

    def shares(self) -> dict[str, float]:
        count = Counter(kind for kind, _ in self.train)
        return {k: count[k] / max(len(self.train), 1) for k in KINDS}


def generate(lang: str, n_train: int, n_dev: int, seed: int, mix: dict[str, float] | None = None) -> Corpus:
    mix = mix or parse_mix(DEFAULT_MIX[lang])
    rng = random.Random(f"{seed}-{lang}")
    words = vocabulary(lang)
    gen = Generator(lang, rng, words)
    unseen = read_unseen(lang)
    grams = held_out_contexts(unseen, set(words[:100]))
    banned = set(unseen)
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]

    def draw(min_words: int) -> tuple[str, str]:
        kind = rng.choices(kinds, weights=weights, k=1)[0]
        for _ in range(MAX_TRIES):
            s = normalize_text(gen.sentence(kind))
            if len(s.split()) >= min_words and s not in banned and not touches(s, grams):
                banned.add(s)
                return kind, s
        raise RuntimeError(f"{lang}: {MAX_TRIES} {kind} sentences in a row were held out or repeated")

    dev = [draw(3) for _ in range(n_dev)]
    train = [draw(1) for _ in range(n_train)]
    return Corpus(train, dev)


def make(lang: str, n_train: int, n_dev: int, seed: int,
         mix: dict[str, float] | None = None) -> tuple[list[str], list[str]]:
    corpus = generate(lang, n_train, n_dev, seed, mix)
    return [t for _, t in corpus.train], [t for _, t in corpus.dev]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-per-lang", type=int, default=30000)
    ap.add_argument("--dev-per-lang", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1234)
    for lang in ("en", "hi"):
        ap.add_argument(f"--mix-{lang}", default=DEFAULT_MIX[lang],
                        help=f"shares of the sentence kinds ({', '.join(KINDS)}) in {lang} (default %(default)s)")
    args = ap.parse_args(argv)
    mixes = {"en": parse_mix(args.mix_en), "hi": parse_mix(args.mix_hi)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for lang in ("en", "hi"):
            corpus = generate(lang, args.train_per_lang, args.dev_per_lang, args.seed, mixes[lang])
            for split, rows in (("dev", corpus.dev), ("train", corpus.train)):
                for _, t in rows:
                    f.write(json.dumps({"split": split, "lang": lang, "text": t}, ensure_ascii=False) + "\n")
            n_words = len({w for _, t in corpus.train for w in t.split()})
            shares = ", ".join(f"{k} {v:.2f}" for k, v in corpus.shares().items())
            print(f"{lang}: {len(corpus.train)} train, {len(corpus.dev)} dev sentences, {n_words} distinct words "
                  f"({shares})", file=sys.stderr)


if __name__ == "__main__":
    main()
