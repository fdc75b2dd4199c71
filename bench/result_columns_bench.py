"""The engine's host work after a step's decode: the decode's labels laid out as the step's result
columns (StreamingEngine._result_columns: counters, token ids with offsets, each row's text), on
the CPU, at a given batch and labels per row. This runs in the engine worker's thread once a
step, between the device's work of that step and the reply, so it is part of what that thread
must fit into one step's device time once the next step's encoder runs beside the decode.

    python bench/result_columns_bench.py --batch 256 --tokens 6           # one tree
    python bench/result_columns_bench.py --trees OLD NEW --rounds 5       # trees alternated

The labels are random pieces of the builtin model's vocabulary, on frames 0-1 of the chunk (a
160 ms chunk has two encoder frames); 6 a row is what the random-weight nemotron-0.6b emits, so
every row has text, the worst case; speech has fewer. No device is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.provenance import describe, source_revision  # noqa: E402  (no torch: the parent of --trees takes it too)


def run_here(batch: int, tokens: int, iters: int) -> dict:
    import numpy as np

    from engines.api import ChunkWork, StepPlan
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.rnnt_decoder import DecodeOutput

    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       max_streams=batch, max_batch=batch))
    g = engine.geometry
    slots = [engine.acquire_slot() for _ in range(batch)]
    rng = np.random.default_rng(0)
    vocab = len(engine.model.pieces)
    labels = [rng.integers(1, vocab - 1, size=tokens).tolist() for _ in range(batch)]
    frames = [sorted(rng.integers(0, 2, size=tokens).tolist()) for _ in range(batch)]
    try:  # the label columns (this tree's DecodeOutput)
        decoded = DecodeOutput(label_ids=np.array(sum(labels, []), dtype=np.int64),
                               label_frames=np.array(sum(frames, []), dtype=np.int64),
                               label_counts=np.full(batch, tokens, dtype=np.int64), state={})
    except TypeError:  # before them: a list per row
        decoded = DecodeOutput(labels=labels, frames=frames, state={})
    audio = np.zeros(g.samples_needed(3), np.float32)
    start, end = g.chunk_span(1, len(audio), False)
    plan = StepPlan(tuple(ChunkWork(f"s{i}", s, audio[start:end], False, False) for i, s in enumerate(slots)))
    args = (plan, np.ones(batch, dtype=np.int64), np.full(batch, -1, dtype=np.int64), np.full(batch, 2, dtype=np.int64),
            decoded)
    for _ in range(20):
        engine._result_columns(*args)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        columns = engine._result_columns(*args)
        times.append(time.perf_counter() - t0)
    assert len(columns.token_ids) == batch * tokens and all(columns.text_delta)
    return {"batch": batch, "tokens_per_row": tokens, "median_us": 1e6 * statistics.median(times),
            "min_us": 1e6 * min(times), "source_revision": source_revision(Path(__file__).resolve().parent.parent)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=6, help="labels per row")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--trees", nargs="*", default=None, help="source trees to alternate (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="(internal) one run here, as JSON")
    args = ap.parse_args()
    if args.json or not args.trees:
        row = run_here(args.batch, args.tokens, args.iters)
        print(json.dumps(row) if args.json else f"batch {row['batch']}, {row['tokens_per_row']} labels a row: "
              f"median {row['median_us']:.0f} us, min {row['min_us']:.0f} us ({describe(row['source_revision'])})")
        return 0
    here = Path(__file__).resolve()
    got: dict[str, list[float]] = {t: [] for t in args.trees}
    revisions: dict[str, dict] = {}
    for _ in range(args.rounds):
        for tree in args.trees:
            done = subprocess.run([sys.executable, str(Path(tree) / "bench" / here.name), "--json", "--batch",
                                   str(args.batch), "--tokens", str(args.tokens), "--iters", str(args.iters)],
                                  capture_output=True, text=True, cwd=tree, env={"PYTHONPATH": tree, "PATH": ""},
                                  check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            got[tree].append(row["median_us"])
            revisions[tree] = row.get("source_revision", {})
    for tree, values in got.items():
        print(f"{tree} ({describe(revisions[tree]) if revisions[tree] else 'revision not recorded'}): median of "
              f"medians {statistics.median(values):.0f} us ({', '.join(f'{v:.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
