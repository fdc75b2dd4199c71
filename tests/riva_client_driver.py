"""Drives the unmodified `nvidia-riva-client` package against a server, the way Riva's example
scripts (scripts/asr/transcribe_file.py, transcribe_file_offline.py, riva_streaming_asr_client.py)
use it, and writes what came back as JSON.

Runs in its own virtual environment (tests/test_riva_client.py builds it): it imports only the
riva client and the standard library, never this repository's modules.

    python riva_client_driver.py --server 127.0.0.1:50051 --input-file a.wav --out result.json
    python riva_client_driver.py --dump-descriptors --out descriptors.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import sys
import time

import grpc
import riva.client
from riva.client.proto import riva_asr_pb2


class CountingChunks:
    """Wraps AudioChunkFileIterator: remembers when gRPC took each audio message and its size."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.sent: list[list[float]] = []

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        data = next(self.chunks)  # a delay_callback sleeps in here, before the message goes out
        self.sent.append([time.monotonic(), len(data)])
        return data


def result_dict(result) -> dict:
    """A StreamingRecognitionResult or (offline) a SpeechRecognitionResult, as plain data."""
    alt = result.alternatives[0] if result.alternatives else None
    streaming = isinstance(result, riva_asr_pb2.StreamingRecognitionResult)
    return {
        "is_final": result.is_final if streaming else True, "stability": result.stability if streaming else None,
        "audio_processed": result.audio_processed, "channel_tag": result.channel_tag,
        "alternatives": len(result.alternatives),
        "transcript": alt.transcript if alt else None,
        "words": [[w.word, w.start_time, w.end_time] for w in alt.words] if alt else [],
    }


def script_config(args, interim_results: bool = True, word_time_offsets: bool = False,
                  diarization: bool = False) -> riva_asr_pb2.StreamingRecognitionConfig:
    """What transcribe_file.py builds with its default arguments (plus the flags named here)."""
    config = riva.client.StreamingRecognitionConfig(
        config=riva.client.RecognitionConfig(
            language_code=args.language_code,
            model=args.model_name,
            max_alternatives=1,
            profanity_filter=False,
            enable_automatic_punctuation=False,
            verbatim_transcripts=True,
            enable_word_time_offsets=word_time_offsets,
        ),
        interim_results=interim_results,
    )
    riva.client.add_word_boosting_to_config(config, None, 4.0)
    riva.client.add_speaker_diarization_to_config(config, diarization, 3)
    riva.client.add_endpoint_parameters_to_config(config, -1, -1.0, -1, -1, -1.0, -1.0)
    riva.client.add_custom_configuration_to_config(config, "")
    return config


def stream(args, paced: bool, chunk_frames: int, interim_results: bool = True, word_time_offsets: bool = False,
           file_specs: bool = False, printed: bool = False) -> dict:
    asr = riva.client.ASRService(riva.client.Auth(uri=args.server))
    config = script_config(args, interim_results, word_time_offsets)
    if file_specs:
        riva.client.add_audio_file_specs_to_config(config, args.input_file)
    delay = riva.client.sleep_audio_length if paced else None
    responses, received = [], []
    with riva.client.AudioChunkFileIterator(args.input_file, chunk_frames, delay) as chunks:
        counted = CountingChunks(chunks)
        generator = asr.streaming_response_generator(audio_chunks=counted, streaming_config=config)

        def recorded():
            for response in generator:
                received.append(time.monotonic())
                responses.append([result_dict(r) for r in response.results])
                yield response

        out = io.StringIO()
        if printed:  # the scripts' own printer must digest every response
            riva.client.print_streaming(responses=recorded(), output_file=out, additional_info="time",
                                        word_time_offsets=word_time_offsets)
        else:
            for _ in recorded():
                pass
    sent = counted.sent
    return {"messages": len(sent), "message_bytes": [n for _, n in sent], "responses": responses,
            "latencies_ms": [round(1000 * (r - s[0]), 1) for s, r in zip(sent, received)],
            "printed": out.getvalue()}


def offline(args, word_time_offsets: bool = True) -> dict:
    """As transcribe_file_offline.py: the whole file, header included, in one request."""
    asr = riva.client.ASRService(riva.client.Auth(uri=args.server))
    config = riva.client.RecognitionConfig(
        language_code=args.language_code, max_alternatives=1, profanity_filter=False,
        enable_automatic_punctuation=False, verbatim_transcripts=True, enable_word_time_offsets=word_time_offsets)
    riva.client.add_word_boosting_to_config(config, None, 4.0)
    riva.client.add_speaker_diarization_to_config(config, False, 3)
    with open(args.input_file, "rb") as fh:
        data = fh.read()
    response = asr.offline_recognize(data, config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        riva.client.print_offline(response=response)
    return {"results": [result_dict(r) for r in response.results], "printed": out.getvalue()}


def list_models(args) -> dict:
    """The `--list-models` code of transcribe_file.py ("online") and transcribe_file_offline.py ("offline")."""
    asr = riva.client.ASRService(riva.client.Auth(uri=args.server))
    config_response = asr.stub.GetRivaSpeechRecognitionConfig(riva.client.proto.riva_asr_pb2.RivaSpeechRecognitionConfigRequest())
    listed = {}
    for kind in ("online", "offline"):
        asr_models = dict()
        for model_config in config_response.model_config:
            if model_config.parameters["type"] == kind:
                language_code = model_config.parameters["language_code"]
                model = {"model": [model_config.model_name]}
                asr_models.setdefault(language_code, []).append(model)
        listed[kind] = dict(sorted(asr_models.items()))
    return listed


def health(args) -> dict:
    """The client's own grpc.health.v1 stubs: overall and for the Riva ASR service."""
    from riva.client.proto import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(riva.client.Auth(uri=args.server).channel)
    return {service or "(server)": health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=service)).status)
            for service in ("", "nvidia.riva.asr.RivaSpeechRecognition")}


def refused(args) -> dict:
    """--speaker-diarization: the server cannot honour it and must say so."""
    asr = riva.client.ASRService(riva.client.Auth(uri=args.server))
    config = script_config(args, diarization=True)
    try:
        with riva.client.AudioChunkFileIterator(args.input_file, 1600) as chunks:
            n = sum(1 for _ in asr.streaming_response_generator(audio_chunks=chunks, streaming_config=config))
        return {"code": "OK", "responses": n}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details()}


def dump_descriptors() -> dict:
    """Every message, enum and service of Riva's ASR protos: name -> {field: [number, type, label, type_name]}."""
    from proto_shape import describe  # tests/, this script's folder
    from riva.client.proto import riva_audio_pb2, riva_common_pb2

    return describe((riva_audio_pb2, riva_common_pb2, riva_asr_pb2))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--input-file")
    p.add_argument("--language-code", default="en-US")
    p.add_argument("--model-name", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--dump-descriptors", action="store_true")
    args = p.parse_args()
    if args.dump_descriptors:
        result = dump_descriptors()
    else:
        jobs = {
            "paced": lambda: stream(args, paced=True, chunk_frames=1600, word_time_offsets=True, printed=True),
            "fast": lambda: stream(args, paced=False, chunk_frames=1600),
            "fast_odd_chunks": lambda: stream(args, paced=False, chunk_frames=2999, interim_results=False,
                                              file_specs=True),
            "offline": lambda: offline(args),
            "models": lambda: list_models(args),
            "health": lambda: health(args),
            "refused": lambda: refused(args),
        }
        result = {"riva_client_version": riva.client.__version__}
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            for name, future in futures.items():
                try:
                    result[name] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported to the test
                    result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
