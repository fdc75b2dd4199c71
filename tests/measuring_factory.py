"""An engine factory for servers under test (`--engine-factory tests.measuring_factory:build`):
the real factory with `--max-batch auto` measured on the CPU too, which production leaves off
(engines.factory.MEASURE_BATCH_ON_CPU says why), so a real server runs the measuring path that
a GPU server runs."""

from __future__ import annotations

from engines import factory


def build(cfg):
    factory.MEASURE_BATCH_ON_CPU = True
    return factory.build_engine(cfg)
