from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    PCM16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
PCM16: AudioEncoding
FLOAT32: AudioEncoding

class EndpointingConfig(_message.Message):
    __slots__ = ("start_history_ms", "start_threshold", "stop_history_ms", "stop_threshold", "stop_history_eou_ms", "stop_threshold_eou")
    START_HISTORY_MS_FIELD_NUMBER: _ClassVar[int]
    START_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STOP_HISTORY_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STOP_HISTORY_EOU_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_THRESHOLD_EOU_FIELD_NUMBER: _ClassVar[int]
    start_history_ms: int
    start_threshold: float
    stop_history_ms: int
    stop_threshold: float
    stop_history_eou_ms: int
    stop_threshold_eou: float
    def __init__(self, start_history_ms: _Optional[int] = ..., start_threshold: _Optional[float] = ..., stop_history_ms: _Optional[int] = ..., stop_threshold: _Optional[float] = ..., stop_history_eou_ms: _Optional[int] = ..., stop_threshold_eou: _Optional[float] = ...) -> None: ...

class RecognitionConfig(_message.Message):
    __slots__ = ("model", "lookahead_ms", "sample_rate", "encoding", "channels", "interim_results", "language", "prompt", "client_label", "endpointing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    lookahead_ms: int
    sample_rate: int
    encoding: AudioEncoding
    channels: int
    interim_results: bool
    language: str
    prompt: str
    client_label: str
    endpointing: EndpointingConfig
    def __init__(self, model: _Optional[str] = ..., lookahead_ms: _Optional[int] = ..., sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., channels: _Optional[int] = ..., interim_results: _Optional[bool] = ..., language: _Optional[str] = ..., prompt: _Optional[str] = ..., client_label: _Optional[str] = ..., endpointing: _Optional[_Union[EndpointingConfig, _Mapping]] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("config", "audio", "end_utterance")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    END_UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio: bytes
    end_utterance: bool
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ..., end_utterance: _Optional[bool] = ...) -> None: ...

class WordTime(_message.Message):
    __slots__ = ("word", "start_seconds", "end_seconds")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    word: str
    start_seconds: float
    end_seconds: float
    def __init__(self, word: _Optional[str] = ..., start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ...) -> None: ...

class TokenTime(_message.Message):
    __slots__ = ("token_id", "piece", "start_seconds")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    piece: str
    start_seconds: float
    def __init__(self, token_id: _Optional[int] = ..., piece: _Optional[str] = ..., start_seconds: _Optional[float] = ...) -> None: ...

class RecognitionResult(_message.Message):
    __slots__ = ("transcript", "is_final", "stability", "words", "tokens", "utterance_index", "start_seconds", "end_seconds", "end_reason")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    is_final: bool
    stability: float
    words: _containers.RepeatedCompositeFieldContainer[WordTime]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenTime]
    utterance_index: int
    start_seconds: float
    end_seconds: float
    end_reason: str
    def __init__(self, transcript: _Optional[str] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., words: _Optional[_Iterable[_Union[WordTime, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[TokenTime, _Mapping]]] = ..., utterance_index: _Optional[int] = ..., start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ..., end_reason: _Optional[str] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("results", "chunk_index", "audio_processed", "stream_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecognitionResult]
    chunk_index: int
    audio_processed: float
    stream_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[RecognitionResult, _Mapping]]] = ..., chunk_index: _Optional[int] = ..., audio_processed: _Optional[float] = ..., stream_id: _Optional[str] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: RecognitionConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("result", "audio_processed", "stream_id", "utterances")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCES_FIELD_NUMBER: _ClassVar[int]
    result: RecognitionResult
    audio_processed: float
    stream_id: str
    utterances: _containers.RepeatedCompositeFieldContainer[RecognitionResult]
    def __init__(self, result: _Optional[_Union[RecognitionResult, _Mapping]] = ..., audio_processed: _Optional[float] = ..., stream_id: _Optional[str] = ..., utterances: _Optional[_Iterable[_Union[RecognitionResult, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "lookahead_ms", "lookaheads_ms", "sample_rate", "chunk_ms", "vocabulary_size", "random_weights", "description", "languages", "engine", "engine_executions", "max_streams", "max_batch", "endpointing_defaults", "eou_token")
    class EngineExecutionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEADS_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_MS_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTING_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    EOU_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    lookahead_ms: int
    lookaheads_ms: _containers.RepeatedScalarFieldContainer[int]
    sample_rate: int
    chunk_ms: float
    vocabulary_size: int
    random_weights: bool
    description: str
    languages: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    engine_executions: _containers.ScalarMap[str, int]
    max_streams: int
    max_batch: int
    endpointing_defaults: EndpointingConfig
    eou_token: str
    def __init__(self, name: _Optional[str] = ..., lookahead_ms: _Optional[int] = ..., lookaheads_ms: _Optional[_Iterable[int]] = ..., sample_rate: _Optional[int] = ..., chunk_ms: _Optional[float] = ..., vocabulary_size: _Optional[int] = ..., random_weights: _Optional[bool] = ..., description: _Optional[str] = ..., languages: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., engine_executions: _Optional[_Mapping[str, int]] = ..., max_streams: _Optional[int] = ..., max_batch: _Optional[int] = ..., endpointing_defaults: _Optional[_Union[EndpointingConfig, _Mapping]] = ..., eou_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
