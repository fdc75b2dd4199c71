"""Regenerate the Python code of proto/*.proto (run from anywhere: `python proto/generate.py`).

protoc runs with the repository root as include path, so the generated modules import each
other as `from proto import asr_stream_pb2`, which is how the server and client import them.
`--check` regenerates into a temporary folder and exits 1 when the committed files differ,
so hand edits and stale code are caught by the tests.

proto/riva/ holds the Riva-compatible API (written for this project from Riva's public field
names and numbers); its modules import each other as `from proto.riva import riva_audio_pb2`.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = (
    "proto/asr_stream.proto",
    "proto/riva/riva_audio.proto",
    "proto/riva/riva_common.proto",
    "proto/riva/riva_asr.proto",
)
# Every generated file, relative to the repository root.
OUTPUTS = tuple(f"{p[:-len('.proto')]}{suffix}" for p in PROTOS
                for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time tool only; the runtime needs grpcio + protobuf

    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(ROOT / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (ROOT / name).exists() or not filecmp.cmp(Path(tmp) / name, ROOT / name, shallow=False)
        ]
    if stale:
        print(f"generated code differs from proto/*.proto: {', '.join(stale)}; run python proto/generate.py")
        return 1
    return 0


def main() -> int:
    if "--check" in sys.argv[1:]:
        return check()
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
