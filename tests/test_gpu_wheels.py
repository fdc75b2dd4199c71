"""The GPU host's wheel recipe (scripts/gpu_wheels.py) pins grpcio where the generated code needs it:
derived from proto/*_grpc.py, equal to pyproject.toml's floor, and one version per package; the
server's own dependencies the GPU image lacks (msgspec, the wire) are in it at a version the
floor admits."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from scripts.gpu_wheels import _key, generated_grpc_versions, recipe, required_grpcio

ROOT = Path(__file__).resolve().parent.parent


def test_grpc_pin_satisfies_every_generated_file():
    versions = generated_grpc_versions()
    assert "proto/asr_stream_pb2_grpc.py" in versions and len(versions) >= 2  # ours and Riva's
    pins = {p.split("==")[0]: p.split("==")[1] for p in recipe({"grpc"})}
    assert set(pins) == {"grpcio", "grpcio-health-checking", "grpcio-reflection"}
    assert len(set(pins.values())) == 1
    assert all(_key(pins["grpcio"]) >= _key(v) for v in versions.values())
    assert pins["grpcio"] == required_grpcio() == max(versions.values(), key=_key)


def test_pyproject_floor_is_what_the_generated_code_demands():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {m.group(1): m.group(2) for d in deps if (m := re.fullmatch(r"(grpcio[\w-]*)>=([0-9.]+)", d))}
    assert floors == {name: required_grpcio() for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection")}


def test_the_generated_code_imports_with_the_grpcio_installed_here():
    import grpc

    from proto import asr_stream_pb2_grpc  # noqa: F401 - raises at import when grpcio is too old
    assert _key(grpc.__version__.split("rc")[0]) >= _key(required_grpcio())


def test_one_version_per_package():
    names = [p.split("==")[0].lower().replace("_", "-") for p in recipe()]
    assert len(names) == len(set(names))
    assert all("==" in p for p in recipe())


def test_the_servers_wire_library_is_in_the_recipe_at_an_admitted_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(m.group(1) for d in deps if (m := re.fullmatch(r"msgspec>=([0-9.]+)", d)))
    pins = {p.split("==")[0]: p.split("==")[1] for p in recipe({"server"})}
    assert _key(pins["msgspec"]) >= _key(floor)
