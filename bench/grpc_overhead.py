"""What a stream's read and write patterns cost a grpc.aio server per chunk, on a bare servicer.

A minimal StreamingRecognize servicer (the project's proto; one small interim response per audio
request, no engine) runs in its own process under uvloop; this script's client holds N streams,
each sending a 160 ms PCM16 chunk every 160 ms and reading every response, for S seconds. The
server process's CPU per chunk is the figure: the floor that grpc.aio itself sets, and what each
way of reading and writing adds to it. The modes (--reads, --writes, comma-separated, every
combination run, alternating, --repeats times):

  reads:  plain       context.read()
          timeout     the request iterator, each read under asyncio.timeout (the idle timeout)
          idle_reads  the request iterator under server.transport.idle_read.IdleReads
  writes: plain       await context.write()
          watched     the servicers' watched write: server.transport.unread_client.WatchedWrites,
                      one per call (in an older tree that has none, its write_watching, per write)

--trees A,B imports the server's modules from each source tree in turn (a git worktree at each
commit): the same servicer on two versions of the transport's helpers.

    python bench/grpc_overhead.py --streams 300 --seconds 12 --repeats 3
    python bench/grpc_overhead.py --trees OLD,NEW --reads idle_reads --writes watched
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("GRPC_OVERHEAD_TREE") or ROOT)

import grpc  # noqa: E402

from proto import asr_stream_pb2 as pb  # noqa: E402
from proto import asr_stream_pb2_grpc as pbg  # noqa: E402

CHUNK_S = 0.16
IDLE_S = 30.0


class _Stream:
    """The StreamState fields WatchedWrites reads."""

    def __init__(self) -> None:
        self.events_ready = asyncio.Event()


class BareServicer(pbg.SpeechRecognitionServicer):
    def __init__(self, reads: str, writes: str):
        self.reads, self.writes = reads, writes

    async def StreamingRecognize(self, request_iterator, context):
        from server.transport import idle_read, unread_client
        requests = request_iterator.__aiter__()
        # A tree without IdleReads times each read with asyncio.timeout; one without
        # WatchedWrites watches each write with write_watching.
        idle = idle_read.IdleReads() if self.reads == "idle_reads" and hasattr(idle_read, "IdleReads") else None
        stream = _Stream()
        watched = None
        if self.writes == "watched" and hasattr(unread_client, "WatchedWrites"):
            watched = unread_client.WatchedWrites(context, stream, lambda: None, IDLE_S)
        k, text = 0, ""
        try:
            while True:
                if self.reads == "plain":
                    request = await context.read()
                    if request is grpc.aio.EOF:
                        break
                else:
                    try:
                        if idle is not None:
                            request = await idle.next(requests, IDLE_S)
                        else:
                            async with asyncio.timeout(IDLE_S):
                                request = await requests.__anext__()
                    except StopAsyncIteration:
                        break
                if request.HasField("config"):
                    continue
                text = (text + " cat")[-80:]
                response = pb.StreamingRecognizeResponse(
                    results=[pb.RecognitionResult(transcript=text, stability=1.0)], chunk_index=k,
                    audio_processed=k * CHUNK_S, stream_id="s")
                if watched is not None:
                    await watched.write(response)
                elif self.writes == "watched":
                    await unread_client.write_watching(context, response, stream, lambda: None, IDLE_S)
                else:
                    await context.write(response)
                k += 1
        finally:
            if idle is not None:
                idle.close()
            if watched is not None:
                watched.close()


async def serve(port: int, reads: str, writes: str) -> None:
    server = grpc.aio.server()
    pbg.add_SpeechRecognitionServicer_to_server(BareServicer(reads, writes), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def drive(port: int, streams: int, seconds: float) -> int:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(max(1, streams // 25))]
    audio = bytes(int(16000 * CHUNK_S) * 2)
    chunks = int(seconds / CHUNK_S)

    async def one(i: int) -> None:
        await asyncio.sleep(CHUNK_S * i / streams)  # spread over a chunk, as a ramp
        call = pbg.SpeechRecognitionStub(channels[i % len(channels)]).StreamingRecognize()
        await call.write(pb.StreamingRecognizeRequest(config=pb.RecognitionConfig()))

        async def read_all() -> None:
            while (await call.read()) is not grpc.aio.EOF:
                pass
        reader = asyncio.ensure_future(read_all())
        start = time.monotonic()
        for c in range(chunks):
            await asyncio.sleep(max(0.0, start + c * CHUNK_S - time.monotonic()))
            await call.write(pb.StreamingRecognizeRequest(audio=audio))
        await call.done_writing()
        await reader

    await asyncio.gather(*(one(i) for i in range(streams)))
    for channel in channels:
        await channel.close()
    return streams * chunks


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(reads: str, writes: str, streams: int, seconds: float, port: int, tree: str) -> float:
    env = dict(os.environ, GRPC_OVERHEAD_TREE=os.path.abspath(tree)) if tree else None
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--reads", reads, "--writes", writes],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare server did not start")
        cpu0 = process_cpu_s(server.pid)
        import uvloop
        chunks = uvloop.run(drive(port, streams, seconds))
        return 1e6 * (process_cpu_s(server.pid) - cpu0) / chunks
    finally:
        server.kill()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reads", default="plain,timeout,idle_reads")
    ap.add_argument("--writes", default="plain,watched")
    ap.add_argument("--trees", default="", help="comma-separated source trees to import the server from (default: this one)")
    ap.add_argument("--port", type=int, default=50097)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        import uvloop
        uvloop.run(serve(args.serve, args.reads, args.writes))
        return
    trees = args.trees.split(",") if args.trees else [""]
    combos = list(itertools.product(trees, args.reads.split(","), args.writes.split(",")))
    runs: dict[tuple[str, str, str], list[float]] = {c: [] for c in combos}
    for rep in range(args.repeats):
        for tree, reads, writes in (combos if rep % 2 == 0 else combos[::-1]):
            us = run_once(reads, writes, args.streams, args.seconds, args.port, tree)
            runs[(tree, reads, writes)].append(us)
            print(f"tree={tree or '.'} reads={reads} writes={writes}: {us:.1f} us per chunk", flush=True)
    print(f"| tree | reads | writes | server CPU per chunk, us (runs) | median |  ({args.streams} streams, {args.seconds:g} s)")
    print("|---|---|---|---|---|")
    for (tree, reads, writes), values in runs.items():
        print(f"| {tree or '.'} | {reads} | {writes} | {', '.join(f'{v:.1f}' for v in values)} | "
              f"{statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()
