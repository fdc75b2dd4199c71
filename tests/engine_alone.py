"""The reference a served transcript must equal: one stream run through an engine by itself.

Works with any StreamingEngine (the fake one or a real one), driving it chunk by chunk with the
spans ChunkGeometry.chunk_span gives when the whole audio is known up front. Call it only while
no server uses the engine (engine steps are not reentrant).
"""

from __future__ import annotations

import numpy as np

from engines.api import ChunkWork, StepPlan


def transcribe_alone(engine, samples: np.ndarray, stream_id: str = "alone") -> str:
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.size == 0:
        return ""
    g = engine.geometry
    slot = engine.acquire_slot()
    text: list[str] = []
    try:
        k = 0
        while (span := g.chunk_span(k, samples.size, True)) is not None:
            start, end = span
            work = ChunkWork(stream_id, slot, samples[start:end], first=k == 0,
                             audio_ended=end == samples.size)
            (update,) = engine.step(StepPlan((work,))).updates
            text.append(update.text_delta)
            k += 1
            if update.is_final:
                break
    finally:
        engine.release_slot(slot)
    return "".join(text)
