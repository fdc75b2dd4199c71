"""The GPU suite: every test under tests/gpu is marked `gpu` and skips cleanly without a CUDA
device ("needs a CUDA device"). On the GPU host: `bash scripts/gpu_suite.sh` (installs the
carried wheels, runs `pytest -m gpu`, writes the result file recorded in tests/gpu/RESULTS.md).

NEMO_STREAM_TEST_ORDER (tests/conftest.py) reorders the suite (reverse, shuffle-SEED): the suite
must pass in any order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = None if cuda_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


def record(name: str, figures: dict) -> None:
    """Figures a GPU test measured (agreement rates, counts), gathered into the suite's result
    file by scripts/gpu_suite.sh (GPU_SUITE_FIGURES names the folder)."""
    folder = os.environ.get("GPU_SUITE_FIGURES")
    print(f"{name}: {json.dumps(figures)}")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures, indent=1))
