"""Token agreement between two runs of the same streams, and building GPU engines."""

from __future__ import annotations

from dataclasses import dataclass


def edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@dataclass
class Agreement:
    streams: int
    reference_tokens: int
    token_edits: int            # insertions + deletions + substitutions against the reference
    transcripts_equal: int      # streams whose whole transcript is identical
    empty_reference: int        # streams the reference transcribed as nothing

    @property
    def token_agreement(self) -> float:
        return 1.0 - self.token_edits / max(self.reference_tokens, 1)

    @property
    def transcript_match(self) -> float:
        return self.transcripts_equal / max(self.streams, 1)

    def as_dict(self) -> dict:
        return {**self.__dict__, "token_agreement": round(self.token_agreement, 6),
                "transcript_match": round(self.transcript_match, 4)}


def agreement(reference: dict, got: dict) -> Agreement:
    """reference / got: {stream: StreamRun} (tests.engine_helpers)."""
    edits = sum(edit_distance(got[s].tokens, reference[s].tokens) for s in reference)
    return Agreement(
        streams=len(reference), reference_tokens=sum(len(r.tokens) for r in reference.values()), token_edits=edits,
        transcripts_equal=sum(got[s].text == reference[s].text for s in reference),
        empty_reference=sum(not r.text.strip() for r in reference.values()))


def build_on(model: str, engine: str, dtype: str, max_streams: int = 256, max_batch: int = 64,
             lookahead_ms: int = 160, device: str = "cuda", **cfg):
    """engines.factory.build_engine, the way asr-server builds its engine: the model is loaded
    afresh (a builtin's random weights come from a fixed seed, so two builds hold the same
    weights). A deep copy of a loaded NeMo model is not used: on the GPU host its preprocessor's
    filterbank stayed on the CPU after .to("cuda")."""
    from engines.config import EngineConfig
    from engines.factory import build_engine

    return build_engine(EngineConfig(model=model, engine=engine, device=device, dtype=dtype, lookahead_ms=lookahead_ms,
                                     max_streams=max_streams, max_batch=max_batch, **cfg))
