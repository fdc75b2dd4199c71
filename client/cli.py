"""`asr-client`: transcribe files through a server, or list its models.

    asr-client transcribe --server localhost:50051 a.wav b.wav [--interim] [--realtime]
    asr-client transcribe --server localhost:50051 --endpointing --stop-history-ms 320 call.wav
    asr-client models --server localhost:50051
    asr-client transcribe --server 10.0.0.5:50051,10.0.0.6:50051 a.wav b.wav   (each stream on the next healthy server)
    asr-client transcribe --server asr.example:443 --tls-ca ca.pem --token-file token a.wav
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from client.balancing import add_target_args
from client.audio_source import FLOAT32, PCM16, AudioFormat
from client.sdk import AsrError, AsyncAsrClient, Credentials, Endpointing, Result, StreamOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="asr-client", description="Client of the streaming ASR server.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="stream files and print their final transcripts")
    t.add_argument("files", nargs="+", metavar="FILE", help="WAV files (or raw audio with --sample-rate)")
    t.add_argument("--interim", action="store_true", help="also print interim transcripts")
    t.add_argument("--realtime", action="store_true", help="send audio no faster than real time")
    t.add_argument("--chunk-ms", type=float, default=100.0, help="audio per message")
    t.add_argument("--sample-rate", type=int, default=0, help="rate of raw (non-WAV) files")
    t.add_argument("--encoding", choices=(PCM16, FLOAT32), default=PCM16, help="encoding of raw files")
    t.add_argument("--channels", type=int, default=1, help="channels of raw files")
    t.add_argument("--model", default="", help="served model name (default: the server's)")
    t.add_argument("--concurrency", type=int, default=4, help="files streamed at once")
    t.add_argument("--words", action="store_true", help="print word times of finals")
    t.add_argument("--endpointing", action="store_true",
                   help="split each file into utterances where the speaker stops: print every utterance's final "
                        "with its index, start and end (seconds from the file's start) and what closed it")
    t.add_argument("--stop-history-ms", type=int, default=0,
                   help="with --endpointing: blank audio that ends an utterance (0: the server's default)")
    t.add_argument("--stop-threshold", type=float, default=0.0,
                   help="with --endpointing: stop threshold (0: the server's default)")
    m = sub.add_parser("models", help="list the models the server serves")
    for cmd in (t, m):
        add_target_args(cmd)
        cmd.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
        cmd.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
        cmd.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify the server with (implies --tls)")
        cmd.add_argument("--tls-cert", default=None, help="PEM client certificate, for mutual TLS (implies --tls)")
        cmd.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
        cmd.add_argument("--tls-server-name", default=None, help="name to check the server's certificate against")
        cmd.add_argument("--token", default=os.environ.get("ASR_TOKEN"),
                         help="bearer token sent with every call (default: $ASR_TOKEN)")
        cmd.add_argument("--token-file", default=None, help="read the bearer token from this file")
    return p.parse_args(argv)


def credentials(args: argparse.Namespace) -> Credentials:
    token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    return Credentials(tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_server_name=args.tls_server_name, token=token or None)


async def _transcribe_one(client: AsyncAsrClient, path: str, args: argparse.Namespace, limit: asyncio.Semaphore) -> bool:
    raw = AudioFormat(args.sample_rate, args.encoding, args.channels) if args.sample_rate else None
    endpointing = (Endpointing(stop_history_ms=args.stop_history_ms, stop_threshold=args.stop_threshold)
                   if args.endpointing else None)
    options = StreamOptions(model=args.model, interim=args.interim, label=path[-128:], endpointing=endpointing)
    async with limit:
        try:
            async for response in client.transcribe(path, options=options, realtime=args.realtime,
                                                    chunk_ms=args.chunk_ms, raw_format=raw):
                for result in response.results if args.endpointing else response.results[:1]:
                    if result.is_final:
                        _print_final(path, result, args)
                    elif args.interim:
                        tag = f" [{result.utterance_index}]" if args.endpointing else ""
                        print(f"{path}{tag} [interim] {result.transcript}", flush=True)
            return True
        except (AsrError, OSError, ValueError) as exc:
            print(f"{path}: error: {exc}", file=sys.stderr, flush=True)
            return False


def _print_final(path: str, result: Result, args: argparse.Namespace) -> None:
    if args.endpointing:
        print(f"{path} [{result.utterance_index}] {result.start:.2f}-{result.end:.2f} s ({result.end_reason}): "
              f"{result.transcript}", flush=True)
    else:
        print(f"{path}: {result.transcript}", flush=True)
    if args.words:
        for w in result.words:
            print(f"  {w.start:8.2f} {w.end:8.2f}  {w.word}", flush=True)


async def _transcribe(args: argparse.Namespace) -> int:
    limit = asyncio.Semaphore(max(args.concurrency, 1))
    async with AsyncAsrClient(args.server, timeout=args.timeout, credentials=credentials(args), balance=args.balance) as client:
        ok = await asyncio.gather(*(_transcribe_one(client, f, args, limit) for f in args.files))
    return 0 if all(ok) else 1


async def _models(args: argparse.Namespace) -> int:
    async with AsyncAsrClient(args.server, timeout=args.timeout, credentials=credentials(args), balance=args.balance) as client:
        try:
            models = await client.list_models()
        except AsrError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for m in models:
        executions = ", ".join(f"{k}={v}" for k, v in sorted(m.engine_executions.items()))
        print(f"{m.name}: lookahead {m.lookahead_ms} ms, chunk {m.chunk_ms:g} ms, {m.sample_rate} Hz, "
              f"engine {m.engine} ({executions}), streams {m.max_streams}, batch {m.max_batch}"
              + (", RANDOM weights" if m.random_weights else ""))
        if m.description:
            print(f"  {m.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(_transcribe(args) if args.command == "transcribe" else _models(args))


if __name__ == "__main__":
    sys.exit(main())
