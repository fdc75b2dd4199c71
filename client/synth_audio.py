"""A tiny deterministic speech-like audio synthesizer for the load generator (numpy only).

Voiced syllables (a harmonic series on a gliding pitch, weighted by two formant-like peaks),
fricative noise bursts and short pauses. It exists so `asr-loadgen` runs with no audio files at
hand; it is not speech, and a real model's transcripts of it mean nothing.
"""

from __future__ import annotations

import numpy as np


def synth_speechlike(seconds: float, seed: int, sample_rate: int = 16000) -> np.ndarray:
    """`seconds` of audio as int16 PCM, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    n = max(int(round(seconds * sample_rate)), 0)
    out = np.zeros(n, dtype=np.float64)
    pos = 0
    while pos < n:
        length = min(int(rng.uniform(0.06, 0.25) * sample_rate), n - pos)
        t = np.arange(length) / sample_rate
        kind = rng.random()
        if kind < 0.6:  # voiced
            f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formants = rng.uniform([300, 900], [900, 2500])
            seg = np.zeros(length)
            for h in range(1, 16):
                gain = sum(1.0 / (1 + ((h * f0 - f) / 150.0) ** 2) for f in formants) / np.sqrt(h)
                seg += gain * np.sin(h * phase)
        elif kind < 0.8:  # fricative: differentiated noise
            seg = np.diff(rng.standard_normal(length + 1) * 0.3)
        else:  # pause with a little room noise
            seg = rng.standard_normal(length) * 0.002
        out[pos:pos + length] = seg * (np.hanning(length) if length > 1 else 1.0)
        pos += length
    peak = float(np.max(np.abs(out))) if n else 0.0
    if peak > 0:
        out *= 0.5 / peak
    return np.clip(np.round(out * 32767), -32768, 32767).astype(np.int16)
