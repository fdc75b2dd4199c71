"""Copies a few held-out utterances into examples/ with a manifest (audio_filepath, text, lang,
voice), for the README's first commands and the demo model's tests.

The rule, fixed before looking at any transcript: per language, the first two utterances of the
held-out set spoken by training voices and the first two spoken by the held-out voice variant,
each at least 2 s long.

  python train/synth_data.py --out data/demo --train-per-lang 12000 --test-per-lang 150 --splits test
  python train/make_examples.py --data data/demo --out examples
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_data import HELDOUT_VARIANT  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--out", default="examples")
    ap.add_argument("--per-group", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    with open(os.path.join(args.data, "test_manifest.json"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    picked = []
    for lang in ("en", "hi"):
        for heldout in (False, True):
            group = [r for r in rows if r["lang"] == lang and r["duration"] >= args.min_seconds
                     and r["voice"].endswith("+" + HELDOUT_VARIANT) == heldout]
            picked += group[: args.per_group]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        for r in picked:
            name = os.path.basename(r["audio_filepath"]).replace("_", "-")
            shutil.copy(os.path.join(args.data, r["audio_filepath"]), os.path.join(args.out, name))
            f.write(json.dumps({"audio_filepath": name, "duration": r["duration"], "text": r["text"],
                                "lang": r["lang"], "voice": r["voice"]}, ensure_ascii=False) + "\n")
            print(name, r["voice"], r["text"])


if __name__ == "__main__":
    main()
