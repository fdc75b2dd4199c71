"""Synthesizes the demo model's English and Hindi training and evaluation speech with eSpeak NG.

The speech engine is PyPI's `espeakng-loader` (a self-contained libespeak-ng with its voice
data), driven through ctypes, so this runs on any Linux x86-64 machine with that wheel and
no system audio libraries. Debian's libespeak-ng works too: pass --espeak-lib/--espeak-data.

Texts are sentences generated from word lists (numbers, dates, times, common words; Hindi in
Devanagari). Held out for evaluation: every test sentence is absent from the training set, and
one voice variant per language (HELDOUT_VARIANT) never speaks in training. Each utterance gets
its own voice variant, rate, pitch and pitch range; then a synthetic room impulse, noise at a
random SNR, gain and leading/trailing silence. Output: 16 kHz mono 16-bit WAVs and NeMo
manifests (one JSON object per line: audio_filepath, duration, text, lang, voice).

Deterministic: the same seed and counts give the same texts, voices, prosody settings,
augmentation and (to a sample or so) lengths (one RNG per utterance, seeded by its index), whatever the number of
worker processes. The samples themselves vary a little from run to run: eSpeak NG adds noise of
its own (breath, flutter) that no seed reaches.

Usage:
  python train/synth_data.py --out data/demo --train-per-lang 4000 --test-per-lang 150
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import unicodedata
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

SAMPLE_RATE = 16000

# --------------------------------------------------------------------------------------------
# Word lists and sentence generators
# --------------------------------------------------------------------------------------------

EN_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
EN_ORD = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
          "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
EN_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
EN_MONTHS = "january february march april may june july august september october november december".split()
EN_NOUNS = ("time day year week month people family child children friend house home room door window "
            "city road street car bus train station airport school office water food money book phone "
            "number name morning evening night price ticket order account message meeting doctor market "
            "river garden table letter computer music picture weather country question answer")
EN_NOUNS = EN_NOUNS.split()
EN_VERBS = ("is was will can should must could would have had make take give find call send open close "
            "buy sell bring keep start stop need want see know think read write pay meet visit leave").split()
EN_ADJ = ("good new first last long great little old big small high right large next early young "
          "important few public bad same able red blue green cold warm quiet busy open free").split()
EN_FUNC = ("the a an of to in for on with at by from and or but not this that it we you they "
           "he she my your our their please".split())
EN_TEMPLATES_WORDS = [
    "please {verb} the {noun} at {time}",
    "the {noun} {verb} {adj} on {day}",
    "we {verb} {num} {noun}s",
    "my {noun} is {adj}",
    "call me on {day} the {ord} of {month}",
    "the meeting is on {month} {ord} at {time}",
    "your order number is {digits}",
    "the price is {num} dollars",
    "{num} people {verb} the {adj} {noun}",
    "open the {noun} and {verb} the {noun}",
    "the train leaves at {time} on {day}",
    "it is {num} degrees in the {noun}",
    "the {adj} {noun} and the {adj} {noun}",
    "send the {noun} to the {noun} before {day}",
    "{day} {month} {ord} {year}",
    "there are {num} {noun}s in the {noun}",
    "{free}",
]


def en_number(n: int) -> str:
    if n < 20:
        return EN_ONES[n]
    if n < 100:
        return EN_TENS[n // 10] + ("" if n % 10 == 0 else " " + EN_ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return EN_ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + en_number(rest))
    if n < 100000:
        rest = n % 1000
        head = en_number(n // 1000) + " thousand"
        if rest == 0:
            return head
        return head + (" and " if rest < 100 else " ") + en_number(rest)
    raise ValueError(n)


def en_ordinal(n: int) -> str:
    if n <= 20:
        return EN_ORD[n - 1]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return {3: "thirtieth"}[tens]
    return EN_TENS[tens] + " " + EN_ORD[ones - 1]


def en_time(rng: random.Random) -> str:
    h = rng.randint(1, 12)
    m = rng.choice([0, 5, 10, 15, 20, 25, 30, 40, 45, 50])
    part = rng.choice(["", " in the morning", " in the evening", " at night"])
    if m == 0:
        return en_number(h) + rng.choice([" o'clock", ""]) + part
    return en_number(h) + " " + en_number(m) + part


def en_year(rng: random.Random) -> str:
    y = rng.randint(1990, 2030)
    if y < 2000:
        return "nineteen " + en_number(y - 1900)
    return rng.choice(["two thousand" + ("" if y == 2000 else " and " + en_number(y - 2000)),
                       "twenty " + en_number(y - 2000) if y >= 2010 else "two thousand " + en_number(y - 2000)])


def en_sentence(rng: random.Random) -> str:
    t = rng.choice(EN_TEMPLATES_WORDS)
    if t == "{free}":
        pool = EN_NOUNS + EN_VERBS + EN_ADJ + EN_FUNC + EN_DAYS + EN_MONTHS
        return " ".join(rng.choice(pool) for _ in range(rng.randint(3, 9)))
    fill = {
        "verb": lambda: rng.choice(EN_VERBS), "noun": lambda: rng.choice(EN_NOUNS),
        "adj": lambda: rng.choice(EN_ADJ), "day": lambda: rng.choice(EN_DAYS),
        "month": lambda: rng.choice(EN_MONTHS), "ord": lambda: en_ordinal(rng.randint(1, 31)),
        "time": lambda: en_time(rng), "year": lambda: en_year(rng),
        "num": lambda: en_number(rng.choice([rng.randint(0, 20), rng.randint(21, 99), rng.randint(100, 999),
                                             rng.randint(1000, 99999)])),
        "digits": lambda: " ".join(EN_ONES[rng.randint(0, 9)] for _ in range(rng.randint(3, 6))),
    }
    out = []
    i = 0
    while i < len(t):
        if t[i] == "{":
            j = t.index("}", i)
            out.append(fill[t[i + 1:j]]())
            i = j + 1
        else:
            out.append(t[i])
            i += 1
    return " ".join("".join(out).split())


HI_NUM = {
    0: "शून्य", 1: "एक", 2: "दो", 3: "तीन", 4: "चार", 5: "पांच", 6: "छह", 7: "सात", 8: "आठ", 9: "नौ",
    10: "दस", 11: "ग्यारह", 12: "बारह", 13: "तेरह", 14: "चौदह", 15: "पंद्रह", 16: "सोलह", 17: "सत्रह",
    18: "अठारह", 19: "उन्नीस", 20: "बीस", 21: "इक्कीस", 22: "बाईस", 23: "तेईस", 24: "चौबीस", 25: "पच्चीस",
    26: "छब्बीस", 27: "सत्ताईस", 28: "अट्ठाईस", 29: "उनतीस", 30: "तीस", 31: "इकतीस", 32: "बत्तीस",
    35: "पैंतीस", 40: "चालीस", 45: "पैंतालीस", 50: "पचास", 60: "साठ", 70: "सत्तर", 75: "पचहत्तर",
    80: "अस्सी", 90: "नब्बे", 99: "निन्यानवे",
}
HI_DAYS = "सोमवार मंगलवार बुधवार गुरुवार शुक्रवार शनिवार रविवार".split()
HI_MONTHS = "जनवरी फरवरी मार्च अप्रैल मई जून जुलाई अगस्त सितंबर अक्टूबर नवंबर दिसंबर".split()
HI_NOUNS = ("घर पानी काम नाम देश शहर गाड़ी किताब दोस्त परिवार बच्चा बच्चे लोग दिन रात सुबह शाम समय साल "
            "महीना हफ्ता दुकान बाजार स्कूल दफ्तर स्टेशन टिकट पैसे फोन खाना चाय दरवाजा खिड़की कमरा सड़क "
            "डॉक्टर मौसम सवाल जवाब संदेश बैठक नदी बगीचा").split()
HI_VERBS = ("है हैं था थी होगा करना करो करें जाना जाओ आना आओ देखो लिखो पढ़ो खोलो बंद भेजो लाओ "
            "चाहिए सकते मिलेंगे चलेंगे बताओ रखो").split()
HI_ADJ = "अच्छा बड़ा छोटा नया पुराना लंबा ठंडा गरम पहला आखिरी सुंदर खाली जरूरी आसान मुश्किल".split()
HI_FUNC = "और का की के में से को पर यह वह हम आप मैं तुम बहुत कुछ आज कल अभी फिर भी नहीं क्या कब कहां".split()
HI_TEMPLATES = [
    "{noun} {adj} {verb}",
    "आज {day} है",
    "{day} {num} {month} को {noun} है",
    "मेरा {noun} {adj} है",
    "कृपया {noun} {verb}",
    "{num} {noun} {verb}",
    "बैठक {day} को {num} बजे है",
    "आपका नंबर {digits} है",
    "इसकी कीमत {num} रुपये है",
    "{noun} में {num} लोग हैं",
    "हम {day} को {noun} {verb}",
    "{num} {month} {noun} का दिन है",
    "{free}",
]


def hi_number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return HI_NUM[rng.choice(sorted(HI_NUM))]
    if kind < 0.85:
        return HI_NUM[rng.randint(1, 9)] + " सौ" + ("" if rng.random() < 0.4 else " " + HI_NUM[rng.choice(sorted(HI_NUM)[1:])])
    return HI_NUM[rng.choice(sorted(HI_NUM)[1:])] + " हजार"


def hi_sentence(rng: random.Random) -> str:
    t = rng.choice(HI_TEMPLATES)
    if t == "{free}":
        pool = HI_NOUNS + HI_VERBS + HI_ADJ + HI_FUNC + HI_DAYS + HI_MONTHS
        return " ".join(rng.choice(pool) for _ in range(rng.randint(3, 9)))
    fill = {
        "verb": lambda: rng.choice(HI_VERBS), "noun": lambda: rng.choice(HI_NOUNS),
        "adj": lambda: rng.choice(HI_ADJ), "day": lambda: rng.choice(HI_DAYS),
        "month": lambda: rng.choice(HI_MONTHS), "num": lambda: hi_number(rng),
        "digits": lambda: " ".join(HI_NUM[rng.randint(0, 9)] for _ in range(rng.randint(3, 6))),
    }
    out, i = [], 0
    while i < len(t):
        if t[i] == "{":
            j = t.index("}", i)
            out.append(fill[t[i + 1:j]]())
            i = j + 1
        else:
            out.append(t[i])
            i += 1
    return normalize_text("".join(out))


def normalize_text(text: str) -> str:
    """The transcript convention: NFC, lower case, words split by single spaces, no punctuation
    but the apostrophe."""
    text = unicodedata.normalize("NFC", text).lower()
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch == "'" or cat[0] in ("L", "M", "N"):
            keep.append(ch)
        else:
            keep.append(" ")
    return " ".join("".join(keep).split())


# --------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------

LANG_VOICES = {"en": ["en-us", "en", "en-us", "en-gb-x-rp"], "hi": ["hi"]}
VARIANTS = ["m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f4", "f5", "klatt", "klatt2", "klatt3",
            "croak", "adam", "david", "anika", "john", "linda", "max", "Andy", "Michael"]
HELDOUT_VARIANT = "f3"  # speaks only in the test set

# The open-vocabulary corpus (--texts) speaks in many more variants. UNSEEN_VARIANTS speak only
# in the unseen evaluation set (train/render_unseen.py); all of them exist in Debian's eSpeak NG
# 1.51 as well as in espeakng-loader's build. Training rates are even words-per-minute values,
# the unseen set's odd ones.
UNSEEN_VARIANTS = ["f3", "m4", "klatt4", "steph", "edward", "iven3"]
OPEN_VARIANTS = [v for v in VARIANTS if v not in UNSEEN_VARIANTS] + [
    "m8", "klatt5", "klatt6", "Alex", "Alicia", "Andrea", "Annie", "Denis", "Gene", "Hugo", "Jacky", "Lee",
    "Marco", "Mario", "Mike", "Storm", "aunty", "belinda", "benjamin", "boris", "caleb", "ed", "edward2",
    "grandma", "grandpa", "gustave", "iven", "iven2", "norbert", "paul", "pedro", "quincy", "rob", "robert",
    "sandro", "shelby", "steph2", "travis", "victor", "zac"]


# --------------------------------------------------------------------------------------------
# eSpeak NG through ctypes
# --------------------------------------------------------------------------------------------

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4


class ESpeak:
    """One process's eSpeak NG instance (the library is process-global)."""

    def __init__(self, lib_path: str | None = None, data_path: str | None = None):
        if lib_path is None or data_path is None:
            import espeakng_loader
            lib_path = lib_path or espeakng_loader.get_library_path()
            data_path = data_path or espeakng_loader.get_data_path()
        # eSpeak's data path is the folder that *contains* espeak-ng-data, or that folder itself
        self.lib = ctypes.CDLL(lib_path)
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(),
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data {data_path}")
        self._chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._on_audio)  # kept alive: eSpeak holds the pointer
        self.lib.espeak_SetSynthCallback(self._cb)
        # The first synthesis after initialization comes out longer than later ones of the same
        # text; one throw-away utterance makes every real one independent of its position.
        self.synth("warm up", "en", 175, 50, 50)

    def _on_audio(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        self.lib.espeak_SetParameter(_RANGE, pitch_range, 0)
        self._chunks = []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling: soxr where installed (a project dependency; about 15x faster),
    else in the frequency domain (numpy only)."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    try:
        import soxr
        return soxr.resample(x.astype(np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)
    except ImportError:
        pass
    pad = sr_in // 10  # zeros on both sides keep the circular wrap-around out of the signal
    y = np.concatenate([np.zeros(pad, np.float32), x, np.zeros(pad, np.float32)])
    n_out = int(round(len(y) * sr_out / sr_in))
    spec = np.fft.rfft(y)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n_out) * (n_out / len(y))
    p_out = int(round(pad * sr_out / sr_in))
    return out[p_out:n_out - p_out].astype(np.float32)


def convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def room_impulse(rng: np.random.Generator, sr: int) -> np.ndarray:
    """A direct path, a few early reflections, and a diffuse tail decaying to -60 dB at RT60."""
    rt60 = rng.uniform(0.15, 0.7)
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    # low-pass the tail a little (walls absorb highs)
    k = rng.integers(1, 4)
    if k > 1:
        tail = np.convolve(tail, np.ones(k) / k, mode="same")
    h = tail * rng.uniform(0.05, 0.3)
    for _ in range(rng.integers(2, 6)):
        d = int(rng.uniform(0.002, 0.03) * sr)
        if d < n:
            h[d] += rng.uniform(-0.6, 0.6)
    h[0] = 1.0
    return (h / np.sqrt(np.sum(h ** 2))).astype(np.float32)


def colored_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:
        out = rng.standard_normal(n)
    else:
        size = 1 << max(n - 1, 1).bit_length()  # a power of two: FFTs of prime lengths are slow
        spec = np.fft.rfft(rng.standard_normal(size))
        f = np.arange(len(spec)) + 1.0
        spec /= f ** (0.5 if kind == 1 else 1.0)  # pink or brown-ish
        out = np.fft.irfft(spec, size)[:n]
    return (out / (np.std(out) + 1e-9)).astype(np.float32)


def augment(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    if strength > 0 and rng.random() < 0.6 * strength + 0.2:
        h = room_impulse(rng, SAMPLE_RATE)
        y = convolve(x, h)[: len(x) + len(h) // 4]
        x = (y * (np.max(np.abs(x)) / (np.max(np.abs(y)) + 1e-9))).astype(np.float32)
    lead = np.zeros(int(rng.uniform(0.05, 0.5) * SAMPLE_RATE), np.float32)
    trail = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
    x = np.concatenate([lead, x, trail])
    if strength > 0:
        snr_db = rng.uniform(8.0, 40.0) if rng.random() < 0.85 * strength + 0.1 else 60.0
        p = np.mean(x ** 2) + 1e-12
        x = x + colored_noise(rng, len(x)) * np.sqrt(p / 10 ** (snr_db / 10))
    peak = np.max(np.abs(x)) + 1e-9
    x = x / peak * rng.uniform(0.1, 0.9)
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    split: str
    index: int
    lang: str
    text: str
    seed: int


def make_texts(rng: random.Random, n_train: int, n_test: int, lang: str) -> tuple[list[str], list[str]]:
    """Distinct test sentences (none of them in training); training sentences may repeat."""
    gen = en_sentence if lang == "en" else hi_sentence
    test: list[str] = []
    seen: set[str] = set()
    while len(test) < n_test:
        s = normalize_text(gen(rng))
        if s not in seen and len(s.split()) >= 3:
            seen.add(s)
            test.append(s)
    train: list[str] = []
    while len(train) < n_train:
        s = normalize_text(gen(rng))
        if s not in seen:
            train.append(s)
    return train, test


_WORKER: dict = {}


def _init_worker(lib_path, data_path):
    _WORKER["tts"] = ESpeak(lib_path, data_path)


def _render(args) -> dict:
    item, out_dir, strength, test_strength, open_vocab = args
    import soundfile as sf
    tts: ESpeak = _WORKER["tts"]
    rng = np.random.default_rng(item.seed)
    r = random.Random(item.seed)
    if open_vocab:
        variant = r.choice(OPEN_VARIANTS)
    elif item.split == "test" and r.random() < 0.5:
        variant = HELDOUT_VARIANT
    else:
        variant = r.choice(VARIANTS)
    voice = r.choice(LANG_VOICES[item.lang]) + "+" + variant
    rate = 2 * r.randint(65, 115) if open_vocab else r.randint(130, 230)
    pitch = r.randint(25, 75)
    prange = r.randint(20, 90)
    raw = tts.synth(item.text, voice, rate, pitch, prange)
    x = resample(raw, tts.sample_rate, SAMPLE_RATE)
    x = augment(x, rng, strength if item.split == "train" else test_strength)
    rel = os.path.join(item.split, f"{item.lang}_{item.index:06d}.wav")
    path = os.path.join(out_dir, rel)
    sf.write(path, x, SAMPLE_RATE, subtype="PCM_16")
    # relative to the manifest's folder (NeMo resolves it there), so the folder can move
    return {"audio_filepath": rel, "duration": round(len(x) / SAMPLE_RATE, 3),
            "text": item.text, "lang": item.lang, "voice": voice, "rate": rate, "pitch": pitch}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-per-lang", type=int, default=4000)
    ap.add_argument("--test-per-lang", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--augment", type=float, default=1.0,
                    help="training augmentation strength: 0 = clean speech, 1 = full augmentation")
    ap.add_argument("--test-augment", type=float, default=0.5, help="the held-out set's augmentation strength")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--langs", default="en,hi")
    ap.add_argument("--splits", default="train,test",
                    help="splits to render (texts are drawn for both either way, so a test set rendered "
                         "alone equals the one rendered with its training set)")
    ap.add_argument("--texts", default=None,
                    help="JSON lines {split: train|dev, lang, text} (train/open_text.py): speak these instead of "
                         "the closed grammar; the dev sentences become the test split")
    ap.add_argument("--espeak-lib", default=None, help="libespeak-ng.so (default: espeakng-loader's)")
    ap.add_argument("--espeak-data", default=None, help="espeak-ng-data folder (default: espeakng-loader's)")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    items: list[Item] = []
    texts_train: list[str] = []
    open_texts: dict[tuple[str, str], list[str]] = {}
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                open_texts.setdefault((row["split"], row["lang"]), []).append(row["text"])
    for lang in args.langs.split(","):
        if args.texts:
            train = open_texts.get(("train", lang), [])[: args.train_per_lang]
            test = open_texts.get(("dev", lang), [])[: args.test_per_lang]
        else:
            train, test = make_texts(rng, args.train_per_lang, args.test_per_lang, lang)
        texts_train += train
        for split, texts in (("train", train), ("test", test)):
            for i, t in enumerate(texts):
                # one RNG seed per utterance, independent of worker count and of str hashing
                seed = (args.seed * 1_000_003 + (0 if split == "train" else 500_000_000)
                        + (0 if lang == "en" else 100_000_000) + i) & 0x7FFFFFFF
                items.append(Item(split, i, lang, t, seed=seed))
    for split in ("train", "test"):
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
    splits = set(args.splits.split(","))
    items = [it for it in items if it.split in splits]
    work = [(it, args.out, args.augment, args.test_augment, bool(args.texts)) for it in items]
    ctx = get_context("fork")
    if args.workers > 1:
        with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.espeak_lib, args.espeak_data)) as pool:
            rows = pool.map(_render, work, chunksize=64)
    else:
        _init_worker(args.espeak_lib, args.espeak_data)
        rows = [_render(w) for w in work]
    by_split: dict[str, list[dict]] = {"train": [], "test": []}
    for it, row in zip(items, rows):
        by_split[it.split].append(row)
    for split, rows_ in by_split.items():
        if split not in splits:
            continue
        with open(os.path.join(args.out, f"{split}_manifest.json"), "w", encoding="utf-8") as f:
            for row in rows_:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if "train" in splits:
        with open(os.path.join(args.out, "train_text.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(texts_train) + "\n")
    hours = sum(r["duration"] for r in by_split["train"]) / 3600
    print(f"wrote {len(by_split['train'])} train ({hours:.2f} h) and {len(by_split['test'])} test utterances "
          f"to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
