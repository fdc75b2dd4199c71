"""An engine factory for servers under test (`--engine-factory tests.measuring_factory:build`):
the real factory with `--max-batch auto` and `--decode-stream auto` measured on the CPU too,
which production leaves off (engines.factory.MEASURE_BATCH_ON_CPU and
MEASURE_DECODE_STREAM_ON_CPU say why), so a real server runs the measuring paths that a GPU
server runs."""

from __future__ import annotations

from engines import factory


def build(cfg):
    factory.MEASURE_BATCH_ON_CPU = True
    factory.MEASURE_DECODE_STREAM_ON_CPU = True
    return factory.build_engine(cfg)
