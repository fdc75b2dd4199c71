"""Renders the unseen evaluation set: everyday sentences (train/unseen/en.txt, hi.txt) that no
training text contains (train/open_text.py also drops every training sentence sharing their
word contexts), spoken by voice variants training never used (synth_data.UNSEEN_VARIANTS) at
rates it never used (odd words per minute; training's are even), each sentence twice:

- build "library": espeakng-loader's libespeak-ng (the build training used);
- build "debian":  Debian's `espeak-ng` program (eSpeak NG 1.51, a different build and version;
                   `apt-get install espeak-ng`), through its command line.

Both get the held-out set's augmentation (room, noise, gain, silence; strength 0.5). Output:
16 kHz WAVs and manifest.json (audio_filepath, duration, text, lang, voice, rate, build).
With --sample-out, a fixed part of the set (every --sample-every'th sentence of each language,
the builds alternating) is copied there as well: the test suite's sample (tests/data/unseen/).

  python train/render_unseen.py --out data/unseen --sample-out tests/data/unseen
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from synth_data import (LANG_VOICES, SAMPLE_RATE, UNSEEN_VARIANTS, ESpeak, augment,  # noqa: E402
                        normalize_text, resample)

BUILDS = ("library", "debian")


def debian_synth(binary: str, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    import soundfile as sf
    out = subprocess.run([binary, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    x, sr = sf.read(io.BytesIO(out), dtype="float32")
    return x, sr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/unseen")
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--espeak-bin", default="espeak-ng", help="the other build's command-line program")
    ap.add_argument("--sample-out", default=None)
    ap.add_argument("--sample-every", type=int, default=5)
    args = ap.parse_args(argv)
    import soundfile as sf
    if shutil.which(args.espeak_bin) is None:
        sys.exit(f"{args.espeak_bin} not found (apt-get install espeak-ng)")
    version = subprocess.run([args.espeak_bin, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"debian build: {version}", file=sys.stderr)
    lib = ESpeak()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for lang in ("en", "hi"):
        with open(os.path.join(HERE, "unseen", f"{lang}.txt"), encoding="utf-8") as f:
            sentences = [normalize_text(line) for line in f if line.strip()]
        for i, text in enumerate(sentences):
            for b, build in enumerate(BUILDS):
                seed = (args.seed * 1_000_003 + (0 if lang == "en" else 10_000) + 2 * i + b) & 0x7FFFFFFF
                r = random.Random(seed)
                voice = r.choice(LANG_VOICES[lang]) + "+" + r.choice(UNSEEN_VARIANTS)
                rate = 2 * r.randint(70, 109) + 1   # odd: 141..219 words per minute
                pitch = r.randint(25, 75)
                if build == "library":
                    raw, sr = lib.synth(text, voice, rate, pitch, r.randint(20, 90)), lib.sample_rate
                else:
                    raw, sr = debian_synth(args.espeak_bin, text, voice, rate, pitch)
                x = augment(resample(raw, sr, SAMPLE_RATE), np.random.default_rng(seed), 0.5)
                name = f"{lang}-{i:03d}-{build}.wav"
                sf.write(os.path.join(args.out, name), x, SAMPLE_RATE, subtype="PCM_16")
                rows.append({"audio_filepath": name, "duration": round(len(x) / SAMPLE_RATE, 3), "text": text,
                             "lang": lang, "voice": voice, "rate": rate, "build": build,
                             "sample": i % args.sample_every == 0 and (i // args.sample_every) % 2 == b})
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "sample"}, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} utterances ({sum(r['duration'] for r in rows) / 60:.1f} min) to {args.out}",
          file=sys.stderr)
    if args.sample_out:
        os.makedirs(args.sample_out, exist_ok=True)
        picked = [r for r in rows if r["sample"]]
        with open(os.path.join(args.sample_out, "manifest.json"), "w", encoding="utf-8") as f:
            for row in picked:
                shutil.copy(os.path.join(args.out, row["audio_filepath"]),
                            os.path.join(args.sample_out, row["audio_filepath"]))
                f.write(json.dumps({k: v for k, v in row.items() if k != "sample"}, ensure_ascii=False) + "\n")
        print(f"sample: {len(picked)} utterances in {args.sample_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
