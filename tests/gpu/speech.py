"""Speech for the GPU suite: the held-out evaluation set of the demo model's speech generator
(train/synth_data.py: eSpeak NG English and Hindi sentences, never in its training set), which
the GPU host cannot make itself (no eSpeak NG there). `python -m tests.gpu.speech --make` writes
it here as FLAC into .gpuspeech/ (git-ignored; it travels with the tree to the GPU host). Without
that folder, the clips are made from examples/: every pair of example files joined, each at two
gains, so the suite still has over 200 streams of speech (fewer distinct sentences)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPEECH_DIR = ROOT / ".gpuspeech"
RATE = 16000


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def clips(min_count: int = 200) -> list[tuple[str, np.ndarray, str]]:
    """[(name, float32 samples at 16 kHz, reference text)], at least `min_count` of them."""
    manifest = SPEECH_DIR / "manifest.json"
    if manifest.exists():
        import soundfile as sf

        out = []
        for line in manifest.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            samples, rate = sf.read(str(SPEECH_DIR / row["file"]), dtype="float32")
            assert rate == RATE
            out.append((row["file"], samples, row["text"]))
        if len(out) >= min_count:
            return out
    rows = [json.loads(line) for line in (ROOT / "examples" / "manifest.json").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    base = [(r["audio_filepath"], r["text"]) for r in rows]
    audio = {name: _read_wav(ROOT / "examples" / Path(name).name) for name, _ in base}
    out = []
    for i, (a, ta) in enumerate(base):
        for j, (b, tb) in enumerate(base):
            for gain in (1.0, 0.5):
                gap = np.zeros(int(RATE * (0.2 + 0.05 * ((i + j) % 5))), np.float32)
                out.append((f"{Path(a).stem}+{Path(b).stem}@{gain}",
                            np.concatenate([audio[a], gap, audio[b]]) * gain, f"{ta} {tb}"))
    reps = -(-min_count // len(out))
    return (out * reps)[:max(min_count, len(out))]


def make(per_lang: int = 110) -> None:
    """Render the held-out set with eSpeak NG (train/synth_data.py) and store it as FLAC."""
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train" / "synth_data.py"), "--out", tmp, "--train-per-lang", "0",
               "--test-per-lang", str(per_lang), "--splits", "test", "--workers", "1"]
        for lib in ("/usr/lib/x86_64-linux-gnu/libespeak-ng.so.1",):
            if Path(lib).exists():  # Debian's eSpeak NG when the espeakng-loader wheel is absent
                cmd += ["--espeak-lib", lib, "--espeak-data", str(Path(lib).parent / "espeak-ng-data")]
        subprocess.run(cmd, check=True)
        SPEECH_DIR.mkdir(exist_ok=True)
        rows = []
        for line in (Path(tmp) / "test_manifest.json").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            name = Path(row["audio_filepath"]).stem + ".flac"
            sf.write(str(SPEECH_DIR / name), _read_wav(Path(tmp) / row["audio_filepath"]), RATE, subtype="PCM_16")
            rows.append({"file": name, "text": row["text"], "lang": row["lang"], "duration": row["duration"]})
    (SPEECH_DIR / "manifest.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                              encoding="utf-8")
    print(f"wrote {len(rows)} clips to {SPEECH_DIR}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make", action="store_true")
    ap.add_argument("--per-lang", type=int, default=110)
    args = ap.parse_args()
    if args.make:
        make(args.per_lang)
    print(f"{len(clips())} clips")
