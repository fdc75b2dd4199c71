"""What the L7 proxy (deploy/haproxy/haproxy.cfg) adds to chunk latency, on loopback.

One asr-server, HAProxy in front of it with the shipped configuration (its server-template
line replaced by one static server), and two asr-loadgen runs at the same time with the same
streams, one straight to the server and one through the proxy: the difference of their p50
chunk latencies (message sent -> the response covering it) is what the proxy adds. Running
both at once puts the machine's own noise (other work, the scheduler's batching) on both sides
alike; the median over rounds is reported.

    python -m bench.proxy_overhead [--rounds 3] [--concurrency 8] [--seconds 6] [--model builtin:tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, factory: str | None) -> tuple[subprocess.Popen, int, int]:
    engine = ["--engine-factory", factory] if factory else ["--model", model, "--device", "cpu"]
    cmd = [sys.executable, "-m", "server.service.cli", *engine, "--host", "127.0.0.1", "--port", "0",
           "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--max-streams", "64", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+).*metrics on http://127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1)), int(m.group(2))
    raise SystemExit("the server exited before listening")


def start_proxy(workdir: Path, port: int, metrics_port: int) -> tuple[subprocess.Popen, int]:
    cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    cfg = re.sub(r"^    server-template .*$", f"    server s1 127.0.0.1:{port}", cfg, flags=re.M)
    (workdir / "haproxy.cfg").write_text(cfg)
    proxy_port = free_port()
    env = dict(os.environ, ASR_PROXY_BIND=f"127.0.0.1:{proxy_port}", ASR_BACKEND_DNS="unused:1",
               ASR_METRICS_PORT=str(metrics_port), ASR_PROXY_STATS=str(workdir / "haproxy.sock"))
    proc = subprocess.Popen([shutil.which("haproxy"), "-db", "-f", str(workdir / "haproxy.cfg")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.0)  # two checks pass (rise 2, inter 1 s)
    return proc, proxy_port


def loadgen(target: str, args, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "client.loadgen", "--server", target, "--concurrency", str(args.concurrency),
           "--synthetic-clips", "4", "--synthetic-seconds", str(args.seconds), "--ramp-s", "1", "--quiet",
           "--cooldown-s", "0", "--json", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)


def latency(proc: subprocess.Popen, out: Path) -> dict:
    if proc.wait() != 0:
        raise SystemExit(f"asr-loadgen failed ({out.name})")
    level = json.loads(out.read_text())["levels"][0]
    assert not level["errors"], level["errors"]
    return level["chunk_latency_ms"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--engine-factory", default=None, help="e.g. tests.fake_engine:build_fake_engine")
    args = p.parse_args()
    if not shutil.which("haproxy"):
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    server, port, metrics_port = start_server(args.model, args.engine_factory)
    with tempfile.TemporaryDirectory() as tmp:
        proxy, proxy_port = start_proxy(Path(tmp), port, metrics_port)
        try:
            deltas = []
            for r in range(args.rounds):
                runs = {side: (loadgen(target, args, Path(tmp) / f"{side}{r}.json"), Path(tmp) / f"{side}{r}.json")
                        for side, target in (("direct", f"127.0.0.1:{port}"), ("proxy", f"127.0.0.1:{proxy_port}"))}
                lat = {side: latency(*run) for side, run in runs.items()}
                deltas.append(lat["proxy"]["p50"] - lat["direct"]["p50"])
                print(f"round {r}: p50 direct {lat['direct']['p50']:7.2f} ms, proxy {lat['proxy']['p50']:7.2f} ms "
                      f"({deltas[-1]:+.2f}); p95 direct {lat['direct']['p95']:7.2f}, proxy {lat['proxy']['p95']:7.2f}",
                      flush=True)
        finally:
            proxy.terminate()
            proxy.wait()
            server.terminate()
            server.wait()
    print(f"the proxy adds {statistics.median(deltas):+.2f} ms to p50 chunk latency (median of {len(deltas)} rounds, "
          f"{min(deltas):+.2f} to {max(deltas):+.2f}; {args.concurrency} streams each side, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
