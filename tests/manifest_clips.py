"""A folder of 16 kHz mono WAVs with a NeMo-style manifest.json (examples/, tests/data/unseen/):
its rows, each with the clip's int16 samples under "pcm". One reader for the demo-model tests."""

from __future__ import annotations

import json
import os


def manifest_clips(folder: str) -> list[dict]:
    import soundfile as sf
    rows = []
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pcm, rate = sf.read(os.path.join(folder, row["audio_filepath"]), dtype="int16")
            assert rate == 16000 and pcm.ndim == 1
            row["pcm"] = pcm
            rows.append(row)
    return rows
