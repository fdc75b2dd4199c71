"""The Riva API's side of the transport: config validation, the WAV/raw audio gate, the
response pacing of StreamingRecognize, and scheduler results -> Riva messages.

No gRPC here (protobuf messages only), so every rule can be tested without a server.

Riva options (nvidia.riva.asr.RecognitionConfig) and what this server does with them:

  honoured  encoding ENCODING_UNSPECIFIED / LINEAR_PCM, sample_rate_hertz (other rates are
            resampled), language_code (one the model lists, or empty), model (a served
            name, or empty), enable_word_time_offsets (word times in ms on final results),
            interim_results, max_alternatives >= 0 (Riva's "up to": greedy decoding gives
            one), audio_channel_count 0 or 1, a speech context without phrases (boosts
            nothing), RequestId (echoed), endpointing_config (Riva's semantics on the model's
            own per-frame blank probability: one final per utterance; unset or -1 fields take
            the server's defaults, and a stream without the message is endpointed with them,
            as Riva does).
  served as the model writes
            enable_automatic_punctuation and verbatim_transcripts (either value): every voice
            agent framework sends punctuation on, and LiveKit leaves verbatim at the proto
            default (false, "apply inverse text normalization"). A model that punctuates
            (Nemotron streaming does) punctuates; one that does not returns its plain text.
            No punctuation or normalization model runs here; the stream's log says so once and
            GetRivaSpeechRecognitionConfig reports what the model does
            (RivaSettings.model_punctuates / model_written_form).
  accepted  custom_configuration keys of Riva's VAD endpointing (enable_vad_endpointing and
            neural_vad.*): endpointing here always acts on the acoustic model's own output, so
            they change nothing; the log says so once.
  refused   (INVALID_ARGUMENT, the message names the field) every other encoding; several
            channels (in the config or the WAV header) and enable_separate_recognition_per_channel;
            speaker diarization (results would lack the speaker tags asked for); speech
            contexts with phrases (word boosting: no boosting decoder runs); the profanity
            filter (masked words would be expected); other custom_configuration keys and
            runtime_config entries.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_audio_pb2 as rau
from server.transport.audio_decoder import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, AudioDecoder, AudioSpec
from server.transport.responses import utterance_words
from engines.api import EndpointingParams
from server.transport.call_limits import shown
from server.transport.stream_config import ServedModel, language_supported, resolve_endpointing
from server.scheduling.stream_events import ChunkResult, ErrorKind, StreamError, Utterance
from server.transport.wav_header import AudioError, SampleEncoding, sniff_audio_start



@dataclass(frozen=True)
class RivaSettings:
    """What the operator knows about the served model that Riva clients may ask for."""

    # The model's own output carries punctuation and capitalisation: honour
    # enable_automatic_punctuation=true (no punctuation model runs; the text is the model's).
    model_punctuates: bool = False
    # The model writes numbers, dates and the like in written form: honour
    # verbatim_transcripts=false (inverse text normalization would not change its text).
    model_written_form: bool = False


@dataclass(frozen=True)
class RivaOptions:
    """A validated Riva config."""

    sample_rate: int            # 0: a WAV header must give it
    encoding: int               # rau.ENCODING_UNSPECIFIED or rau.LINEAR_PCM
    channels: int               # 0 (unset) or 1
    interim_results: bool
    word_times: bool
    label: str
    endpointing: EndpointingParams | None = None
    # Options served differently from how a Riva server with extra models would, said once in
    # the stream's log (not per chunk).
    notes: tuple[str, ...] = ()


_VAD_KEYS = ("enable_vad_endpointing",)
_VAD_PREFIXES = ("neural_vad.",)


def invalid(message: str) -> StreamError:
    return StreamError(ErrorKind.INVALID_ARGUMENT, message)


def validate_riva_config(cfg: rpb.RecognitionConfig, served: ServedModel, settings: RivaSettings,
                         interim_results: bool = False, label: str = "") -> RivaOptions:
    """Raises StreamError(INVALID_ARGUMENT) naming the first option this server cannot honour."""
    if cfg.model and cfg.model not in served.names:
        raise invalid(f"model {shown(cfg.model)} is not served here; served: {', '.join(served.names)}")
    languages = served.info.languages
    if cfg.language_code and not language_supported(cfg.language_code, languages):
        raise invalid(f"language_code {shown(cfg.language_code)} is not supported by {served.info.name}; "
                      f"supported: {', '.join(languages)}")
    if cfg.encoding not in (rau.ENCODING_UNSPECIFIED, rau.LINEAR_PCM):
        name = rau.AudioEncoding.Name(cfg.encoding) if cfg.encoding in rau.AudioEncoding.values() else str(cfg.encoding)
        raise invalid(f"encoding {name} is not supported; send LINEAR_PCM (16-bit), raw or as a WAV file")
    if cfg.sample_rate_hertz and not MIN_SAMPLE_RATE <= cfg.sample_rate_hertz <= MAX_SAMPLE_RATE:
        raise invalid(f"sample_rate_hertz {cfg.sample_rate_hertz} is outside the supported range "
                      f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz (0: take it from the WAV header)")
    if cfg.audio_channel_count < 0 or cfg.audio_channel_count > 1:
        raise invalid(f"audio_channel_count {cfg.audio_channel_count}: only mono audio is served "
                      "(send one channel, or 0 for mono)")
    if cfg.enable_separate_recognition_per_channel:
        raise invalid("enable_separate_recognition_per_channel is not supported: only mono audio is served")
    if cfg.max_alternatives < 0:
        raise invalid(f"max_alternatives {cfg.max_alternatives} must be >= 0")
    if cfg.profanity_filter:
        raise invalid("profanity_filter is not supported by this server; send profanity_filter=false")
    if cfg.HasField("diarization_config") and cfg.diarization_config.enable_speaker_diarization:
        raise invalid("speaker diarization (diarization_config.enable_speaker_diarization) is not supported")
    boosted = [p for context in cfg.speech_contexts for p in context.phrases if p]
    if boosted:
        raise invalid(f"speech_contexts (word boosting of {len(boosted)} phrase(s)) are not supported by "
                      f"{served.info.name}; send no phrases")
    notes = []
    other = sorted(k for k in cfg.custom_configuration
                   if k not in _VAD_KEYS and not k.startswith(_VAD_PREFIXES))
    if other:
        raise invalid(f"custom_configuration keys not supported: {', '.join(shown(k) for k in other[:5])} "
                      f"(accepted: {', '.join(_VAD_KEYS)}, neural_vad.*)")
    if cfg.custom_configuration:
        notes.append("custom_configuration VAD keys change nothing: endpointing acts on the model's own output")
    e = cfg.endpointing_config
    endpointing = resolve_endpointing(
        {name: (getattr(e, name) if e.HasField(name) else None)
         for name in ("start_history", "start_threshold", "stop_history", "stop_threshold",
                      "stop_history_eou", "stop_threshold_eou")},
        served.endpointing, "endpointing_config")
    if cfg.enable_automatic_punctuation and not settings.model_punctuates:
        notes.append(f"enable_automatic_punctuation: model {served.info.name} does not punctuate and no "
                     "punctuation model runs here; its plain text is served")
    if not cfg.verbatim_transcripts and not settings.model_written_form:
        notes.append("verbatim_transcripts=false: no inverse text normalization runs here; the model's text "
                     "is served as it writes it")
    return RivaOptions(sample_rate=cfg.sample_rate_hertz, encoding=cfg.encoding, channels=cfg.audio_channel_count,
                       interim_results=interim_results, word_times=cfg.enable_word_time_offsets, label=label,
                       endpointing=endpointing, notes=tuple(notes))


def check_runtime_config(request: rpb.StreamingRecognizeRequest) -> None:
    if request.runtime_config:
        raise invalid(f"runtime_config is not supported (got keys: {shown(', '.join(sorted(request.runtime_config)))})")


def request_label(request_id: str) -> str:
    """The stream label for server logs: 'riva', plus the client's RequestId when printable."""
    value = "".join(ch for ch in request_id if ch.isprintable())[:100]
    return f"riva:{value}" if value else "riva"


# -- audio --------------------------------------------------------------------------------------
class RivaAudio:
    """Audio bytes of one Riva request -> mono float32 samples at the model's rate.

    Decides from the first bytes whether they hold a WAV header, checks the header against the
    config in Riva's terms (a mismatch is an AudioError, i.e. INVALID_ARGUMENT), then hands
    every byte to the shared AudioDecoder.
    """

    def __init__(self, options: RivaOptions, target_rate: int, max_header_bytes: int = 1 << 16):
        self.options = options
        self.target_rate = target_rate
        self.max_header_bytes = max_header_bytes
        self._pending = b""
        self._decoder: AudioDecoder | None = None

    def feed(self, data: bytes) -> np.ndarray:
        if self._decoder is None:
            self._pending += data
            if not self._open(final=False):
                return _EMPTY
            data, self._pending = self._pending, b""
        return self._decoder.feed(data)

    def finish(self) -> np.ndarray:
        if self._decoder is None:
            if not self._pending:
                return _EMPTY  # no audio at all
            self._open(final=True)
            data, self._pending = self._pending, b""
            return np.concatenate([self._decoder.feed(data), self._decoder.finish()])
        return self._decoder.finish()

    @property
    def input_seconds(self) -> float:
        return self._decoder.input_seconds if self._decoder is not None else 0.0

    def _open(self, final: bool) -> bool:
        o = self.options
        start = sniff_audio_start(self._pending, final, self.max_header_bytes)
        if start.need_more:
            return False
        header = start.header
        if header is not None:
            if o.sample_rate and o.sample_rate != header.sample_rate:
                raise AudioError(f"sample_rate_hertz is {o.sample_rate} but the WAV header says "
                                 f"{header.sample_rate} Hz; send 0 or the file's rate")
            if o.encoding == rau.LINEAR_PCM and header.encoding is not SampleEncoding.PCM16:
                raise AudioError(f"encoding is LINEAR_PCM (16-bit) but the WAV header says "
                                 f"{header.encoding.value}; send ENCODING_UNSPECIFIED for such files")
            if header.channels != 1:
                raise AudioError(f"the WAV header says {header.channels} channels: only mono audio is served")
            spec = AudioSpec()  # the header decides; nothing in the config contradicts it
        else:
            if not o.sample_rate:
                raise AudioError("sample_rate_hertz is required for raw audio (the audio does not start "
                                 "with a WAV header)")
            spec = AudioSpec(encoding=SampleEncoding.PCM16, sample_rate=o.sample_rate, channels=1)
        self._decoder = AudioDecoder(spec, self.target_rate, self.max_header_bytes)
        return True


_EMPTY = np.zeros(0, dtype=np.float32)


# -- StreamingRecognize: one response per audio message ---------------------------------------
class ResponsePacer:
    """Which audio messages of a stream may be answered now.

    Response i answers audio message i once the engine has decoded all audio that message
    brought (the samples it added, at the model's rate, counted from the stream's start):
    so a client that times message i's send to response i's arrival, as Riva's clients do,
    measures the real latency of that audio. A message that adds no samples (a WAV header,
    an empty message) is answered as soon as the messages before it are. At the final result
    every message still open is answered, the last one with the final; with no message open
    the final goes out in one extra response (Riva's clients accept one response more than
    the messages they sent, and a stream with no audio needs it).
    """

    def __init__(self) -> None:
        self._ends: collections.deque[int] = collections.deque()  # audio end of each open message
        self._received = 0      # samples of every message registered so far
        self.decoded = 0        # samples the engine has decoded
        self.messages = 0
        self.answered = 0

    def message(self, samples: int) -> None:
        """An audio message arrived, adding `samples` samples (before they go to the scheduler)."""
        self._received += samples
        self._ends.append(self._received)
        self.messages += 1

    def progress(self, decoded_samples: int) -> int:
        """The engine has decoded this many samples; returns how many messages to answer now."""
        self.decoded = max(self.decoded, decoded_samples)
        return self.ready()

    def ready(self) -> int:
        n = 0
        while self._ends and self._ends[0] <= self.decoded:
            self._ends.popleft()
            n += 1
        self.answered += n
        return n

    def finish(self) -> int:
        """The final result is here: how many responses carry it and the interims before it
        (at least one)."""
        n = len(self._ends)
        self._ends.clear()
        self.answered += n
        return max(n, 1)

    @property
    def open_messages(self) -> int:
        return len(self._ends)


# -- results -> Riva messages ---------------------------------------------------------------
def final_alternative(utterance: Utterance, word_times: bool, frame_seconds: float) -> rpb.SpeechRecognitionAlternative:
    alt = rpb.SpeechRecognitionAlternative(transcript=utterance.transcript)
    if word_times:
        alt.words.extend(rpb.WordInfo(word=w.word, start_time=round(w.start_seconds * 1000),
                                      end_time=round(w.end_seconds * 1000))
                         for w in utterance_words(utterance, frame_seconds))
    return alt


def final_result(utterance: Utterance, options: RivaOptions, frame_seconds: float,
                 audio_seconds: float) -> rpb.StreamingRecognitionResult:
    return rpb.StreamingRecognitionResult(
        alternatives=[final_alternative(utterance, options.word_times, frame_seconds)],
        is_final=True, stability=1.0, channel_tag=1, audio_processed=audio_seconds)


def interim_result(event: ChunkResult | None) -> rpb.StreamingRecognitionResult:
    """The open utterance so far; `event` None: nothing decoded yet (an empty interim). Greedy
    decoding never revises emitted text, hence stability 1.0 (the last word may still grow)."""
    if event is None:
        return rpb.StreamingRecognitionResult(alternatives=[rpb.SpeechRecognitionAlternative()],
                                              is_final=False, stability=1.0, channel_tag=1)
    return rpb.StreamingRecognitionResult(
        alternatives=[rpb.SpeechRecognitionAlternative(transcript=event.transcript)],
        is_final=False, stability=1.0, channel_tag=1, audio_processed=event.audio_seconds)


def streaming_response(latest: ChunkResult | None, options: RivaOptions, frame_seconds: float,
                       finals: tuple[Utterance, ...], request_id: str, stream_over: bool = False
                       ) -> rpb.StreamingRecognizeResponse:
    """One response: the finals it carries (utterances closed since the last response), then the
    open utterance's interim when interim results are on and the stream goes on."""
    response = rpb.StreamingRecognizeResponse()
    if request_id:
        response.id.value = request_id
    audio_seconds = latest.audio_seconds if latest is not None else 0.0
    response.results.extend(final_result(u, options, frame_seconds, audio_seconds) for u in finals)
    if options.interim_results and not stream_over:
        response.results.append(interim_result(latest))
    return response


def recognize_response(finals: list[Utterance], audio_seconds: float, options: RivaOptions, frame_seconds: float,
                       request_id: str) -> rpb.RecognizeResponse:
    """One result per utterance, as Riva's offline recognition returns them."""
    response = rpb.RecognizeResponse(results=[
        rpb.SpeechRecognitionResult(alternatives=[final_alternative(u, options.word_times, frame_seconds)],
                                    channel_tag=1, audio_processed=audio_seconds)
        for u in finals])
    if request_id:
        response.id.value = request_id
    return response


def model_configs(served: ServedModel, parameters: dict[str, str]) -> list[rpb.RivaSpeechRecognitionConfigResponse.Config]:
    """One entry per mode: Riva's scripts list "online" models for streaming and "offline"
    ones for Recognize, and this model serves both."""
    info = served.info
    base = {"language_code": ",".join(info.languages), "sample_rate": str(info.sample_rate),
            "lookahead_ms": str(info.lookahead_ms), "random_weights": str(info.random_weights).lower(),
            "description": info.description, **parameters}
    Config = rpb.RivaSpeechRecognitionConfigResponse.Config
    return [Config(model_name=info.name, parameters={**base, "type": kind, "streaming": str(kind == "online").lower()})
            for kind in ("online", "offline")]
