"""On a GPU: after the engine's warm-up, serving mixed batches captures no further CUDA graph
(the decode loop's graphs are captured per batch bucket and frame count during warm-up).
Prints the counts; exits 1 if a capture happened while serving.

    python bench/check_warm_captures.py [--model builtin:nemotron-0.6b] [--max-batch 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--engine", default="fast-cudagraph")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--lookahead-ms", type=int, default=160)
    args = ap.parse_args()
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.models import speechlike_audio
    from tests.engine_helpers import run_streams
    engine = build_engine(EngineConfig(model=args.model, engine=args.engine, device="cuda", dtype="float16",
                                       lookahead_ms=args.lookahead_ms, max_streams=2 * args.max_batch,
                                       max_batch=args.max_batch))
    t0 = time.time()
    engine.warmup()
    warm_s = time.time() - t0
    captured = len(engine.decoder._graphs)
    audio = {f"s{i}": speechlike_audio(0.5 + 0.07 * i, seed=300 + i) for i in range(args.max_batch)}
    run_streams(engine, audio, seed=3)
    after = len(engine.decoder._graphs)
    print(f"{args.model} {args.engine} {args.lookahead_ms} ms max_batch {args.max_batch}: warm-up {warm_s:.1f} s, "
          f"decode graphs after warm-up {captured}, after serving {after}")
    return 0 if after == captured else 1


if __name__ == "__main__":
    sys.exit(main())
