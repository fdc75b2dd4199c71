"""Validate a client's RecognitionConfig against the served model (transport layer).

Every rejection is a StreamError(INVALID_ARGUMENT) whose message names the field and the
allowed values, so a client can fix its request without reading server logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.api import ModelInfo
from engines.geometry import ChunkGeometry
from proto import asr_stream_pb2 as pb
from server.audio_decoder import AudioSpec
from server.call_limits import shown
from server.stream_events import ErrorKind, StreamError
from server.wav_header import AudioError, SampleEncoding

MAX_LABEL_CHARS = 128
_ENCODINGS = {
    pb.AUDIO_ENCODING_UNSPECIFIED: None,
    pb.PCM16: SampleEncoding.PCM16,
    pb.FLOAT32: SampleEncoding.FLOAT32,
}


@dataclass(frozen=True)
class ServedModel:
    """The one model this server runs, and the names a client may ask for it by."""

    info: ModelInfo
    geometry: ChunkGeometry
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.info.name, *(a for a in self.aliases if a and a != self.info.name))


@dataclass(frozen=True)
class StreamOptions:
    audio: AudioSpec
    interim_results: bool
    language: str
    label: str


def primary_language(code: str) -> str:
    """BCP-47 primary language subtag: 'en-US' (or 'en_US') is 'en'."""
    return code.replace("_", "-").split("-")[0].lower()


def language_supported(code: str, languages: tuple[str, ...]) -> bool:
    """A hint is honoured when the model lists its primary language; a model that lists none
    (a .nemo file that does not say) takes any hint."""
    return not languages or primary_language(code) in {primary_language(x) for x in languages}


def invalid(message: str) -> StreamError:
    return StreamError(ErrorKind.INVALID_ARGUMENT, message)


def validate_config(cfg: pb.RecognitionConfig, served: ServedModel) -> StreamOptions:
    if cfg.model and cfg.model not in served.names:
        raise invalid(f"model {shown(cfg.model)} is not served here; served: {', '.join(served.names)}")
    if cfg.lookahead_ms and cfg.lookahead_ms != served.info.lookahead_ms:
        raise invalid(f"lookahead_ms {cfg.lookahead_ms} is not served here; this server runs "
                      f"{served.info.lookahead_ms} ms (send 0 for the server's lookahead)")
    if cfg.encoding not in _ENCODINGS:
        raise invalid(f"encoding {cfg.encoding} is unknown; use PCM16 or FLOAT32")
    if cfg.language and not language_supported(cfg.language, served.info.languages):
        raise invalid(f"language {shown(cfg.language)} is not supported by {served.info.name}; "
                      f"supported: {', '.join(served.info.languages)} (BCP-47, matched by the primary "
                      "language: en-US is en)")
    if cfg.prompt:
        raise invalid(f"model {served.info.name} takes no prompt; leave prompt empty")
    if len(cfg.client_label) > MAX_LABEL_CHARS or not cfg.client_label.isprintable():
        raise invalid(f"client_label must be at most {MAX_LABEL_CHARS} printable characters")
    try:
        audio = AudioSpec(encoding=_ENCODINGS[cfg.encoding], sample_rate=cfg.sample_rate, channels=cfg.channels)
    except AudioError as exc:
        raise invalid(str(exc)) from exc
    return StreamOptions(audio=audio, interim_results=cfg.interim_results, language=cfg.language,
                         label=cfg.client_label)
