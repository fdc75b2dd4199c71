"""Validate a client's RecognitionConfig against the served model (transport layer).

Every rejection is a StreamError(INVALID_ARGUMENT) whose message names the field and the
allowed values, so a client can fix its request without reading server logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.api import MAX_ENDPOINT_HISTORY_MS, EndpointingParams, ModelInfo
from engines.geometry import ChunkGeometry
from proto import asr_stream_pb2 as pb
from server.transport.audio_decoder import AudioSpec
from server.transport.call_limits import shown
from server.scheduling.stream_events import ErrorKind, StreamError
from server.transport.wav_header import AudioError, SampleEncoding

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
    # What an endpointing setting left unset means (asr-server --endpoint-* flags).
    endpointing: EndpointingParams = EndpointingParams()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.info.name, *(a for a in self.aliases if a and a != self.info.name))


@dataclass(frozen=True)
class StreamOptions:
    audio: AudioSpec
    interim_results: bool
    language: str
    label: str
    endpointing: EndpointingParams | None = None  # None: the stream is one utterance


_ENDPOINT_FIELDS = (("start_history", "start_history_ms"), ("start_threshold", "start_threshold"),
                    ("stop_history", "stop_history_ms"), ("stop_threshold", "stop_threshold"),
                    ("stop_history_eou", "stop_history_eou_ms"), ("stop_threshold_eou", "stop_threshold_eou"))


def resolve_endpointing(values: dict[str, float | None], defaults: EndpointingParams, where: str) -> EndpointingParams:
    """A client's endpointing settings (Riva's field names; None or a negative value: the
    server's default) over the server's defaults; out of range is INVALID_ARGUMENT naming the
    field."""
    resolved = {}
    for name, param in _ENDPOINT_FIELDS:
        value = values.get(name)
        if value is None or value < 0:
            resolved[param] = getattr(defaults, param)
            continue
        if name.endswith(("history", "history_eou")):
            if value > MAX_ENDPOINT_HISTORY_MS or value != int(value):
                raise invalid(f"{where}.{name} {value:g} must be a whole number of milliseconds in "
                              f"0..{MAX_ENDPOINT_HISTORY_MS} (-1: the server's default)")
            resolved[param] = int(value)
        else:
            if value > 1.0:
                raise invalid(f"{where}.{name} {value:g} must be in 0.0..1.0 (-1: the server's default)")
            resolved[param] = float(value)
    return EndpointingParams(**resolved)


def native_endpointing(cfg: pb.RecognitionConfig, defaults: EndpointingParams) -> EndpointingParams | None:
    """The native config's endpointing: None when the message is absent; 0 or -1 in a field
    means the server's default (proto3 cannot tell 0 from unset)."""
    if not cfg.HasField("endpointing"):
        return None
    e = cfg.endpointing
    values = {"start_history": e.start_history_ms, "start_threshold": e.start_threshold,
              "stop_history": e.stop_history_ms, "stop_threshold": e.stop_threshold,
              "stop_history_eou": e.stop_history_eou_ms, "stop_threshold_eou": e.stop_threshold_eou}
    return resolve_endpointing({k: (None if v == 0 else v) for k, v in values.items()}, defaults, "endpointing")


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
                         label=cfg.client_label, endpointing=native_endpointing(cfg, served.endpointing))
