"""The wheels a GPU host without network needs to run this project: one recipe, derived from the
repository rather than remembered.

The GPU image (torch, CUDA, numpy, onnxruntime, sentencepiece, pytest, uvloop, prometheus-client,
protobuf; see docs/GPU.md) lacks NeMo's ASR stack, and its grpcio may be older than the version the
committed generated code demands. This script lists and downloads, for CPython 3.12 on x86-64 Linux:

- `grpc`: grpcio, grpcio-health-checking and grpcio-reflection at exactly the version the generated
  code under proto/ checks at import (`GRPC_GENERATED_VERSION`, the highest over every *_grpc.py),
  which pyproject.toml's floor must match;
- `server`: the server's own dependencies missing from the image: msgspec, the typed wire between
  the server's processes (server/runtime/wire.py), at a version pyproject.toml's floor admits;
- `nemo`: NeMo 3.0's ASR dependencies missing from the image;
- `tests`: pytest-asyncio, pytest-timeout and the pytest they were tested with, for `bash scripts/gpu_suite.sh`.

    python scripts/gpu_wheels.py --list                 # the pins, one a line
    python scripts/gpu_wheels.py --download .whl         # fetch them (needs registry access)
    python scripts/gpu_wheels.py --download .whl --only grpc,server,tests

On the host, install them first thing (scripts/gpu_suite.sh and bench/run_h100.sh do):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# NeMo 3.0.0's ASR stack, less what the GPU image already holds (checked on H100 and H200 images:
# `from nemo.collections.asr.models import EncDecRNNTModel` imports and runs with these).
NEMO = (
    "nemo_toolkit==3.0.0", "lightning==2.4.0", "StrEnum==0.4.15", "annotated-types==0.8.0", "braceexpand==0.1.7",
    "cffi==2.1.1", "cytoolz==1.2.0", "datasets==5.2.0", "dill==0.4.1", "googleapis-common-protos==1.76.0",
    "httpcore2==2.16.2", "httpx2==2.16.2", "hydra-core==1.3.2", "intervaltree==3.2.1", "kaldialign==0.12.0",
    "lhotse==1.33.0", "librosa==0.11.0", "multiprocess==0.70.19", "nv_one_logger_core==2.3.1",
    "nv_one_logger_pytorch_lightning_integration==2.3.1", "nv_one_logger_training_telemetry==2.3.1",
    "omegaconf==2.3.0", "overrides==7.7.0", "pydantic==2.14.3", "pydantic-core==2.50.4", "sniffio==1.3.1",
    "soundfile==0.14.0", "toml==0.10.2", "truststore==0.10.5", "typing-inspection==0.4.5", "webdataset==1.0.2",
    "audioread==3.1.0", "soxr==1.1.0", "pooch==1.9.0", "decorator==5.3.1", "platformdirs==4.14.7",
    "pycparser==3.12",
)
# omegaconf 2.3 needs antlr4 4.9.3, published only as a source archive: built into a wheel here.
SOURCE_ONLY = ("antlr4-python3-runtime==4.9.3",)
# The server's dependencies the image lacks (msgspec: a cp312 manylinux wheel is published).
SERVER = ("msgspec==0.23.0",)
TESTS = ("pytest==9.2.0", "pluggy==1.7.0", "iniconfig==2.3.1", "pytest-asyncio==1.5.0", "pytest-timeout==2.4.0")


def generated_grpc_versions(root: Path = ROOT) -> dict[str, str]:
    """{generated file: the grpcio version it demands at import}."""
    out = {}
    for f in sorted((root / "proto").rglob("*_grpc.py")):
        m = re.search(r"^GRPC_GENERATED_VERSION\s*=\s*['\"]([0-9.]+)['\"]", f.read_text(), re.M)
        if m:
            out[str(f.relative_to(root))] = m.group(1)
    return out


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def required_grpcio(root: Path = ROOT) -> str:
    versions = generated_grpc_versions(root)
    if not versions:
        raise SystemExit("no generated *_grpc.py with GRPC_GENERATED_VERSION under proto/")
    return max(versions.values(), key=_key)


def grpc_pins(root: Path = ROOT) -> tuple[str, ...]:
    v = required_grpcio(root)
    return (f"grpcio=={v}", f"grpcio-health-checking=={v}", f"grpcio-reflection=={v}")


def recipe(only: set[str] | None = None) -> list[str]:
    groups = {"grpc": grpc_pins(), "server": SERVER, "nemo": NEMO, "tests": TESTS}
    return [pin for name, pins in groups.items() if only is None or name in only for pin in pins]


def download(dest: Path, pins: list[str], with_source_only: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64",
                                                                                   "manylinux1_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + pins, check=True)
    if with_source_only:
        for pin in SOURCE_ONLY:
            name = pin.split("==")[0].replace("-", "_")
            if not list(dest.glob(f"{name}-*.whl")):
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), pin],
                               check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--download", metavar="DIR")
    ap.add_argument("--only", default=None, help="comma-separated groups: grpc, server, nemo, tests (default: all)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    pins = recipe(only)
    if args.download:
        download(Path(args.download), pins, with_source_only=only is None or "nemo" in only)
    if args.list or not args.download:
        print("\n".join(pins + (list(SOURCE_ONLY) if only is None or "nemo" in only else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
