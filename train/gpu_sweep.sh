#!/usr/bin/env bash
# Several training runs side by side on one GPU host, each with its own overrides: the demo
# model's trainer is bound by one Python thread per step, so one H100 carries several at once.
# Synthesizes the data once, starts one train.py per variant (each with a share of the CPU
# cores for its data loader) and waits. The device tool returns only a few files, so $OUT gets
# sweep.json (every run's summary), sweep.log (their progress lines) and best/ (the package of
# the run with the lowest final validation WER); the runs themselves stay in $RUNS.
#   bash train/gpu_sweep.sh "name1 key=value ..." "name2 key=value ..." ...
# Options for every run go in COMMON (e.g. COMMON="--init-from runs/x/demo").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DATA=${DATA_DIR:-/tmp/demo_data} OUT=${OUT:-runs/sweep} RUNS=${RUNS_DIR:-/tmp/sweep}
mkdir -p "$OUT" "$RUNS"
nvidia-smi -L || true
start=$(date +%s)
python3 train/synth_data.py --out "$DATA" --train-per-lang "${TRAIN_PER_LANG:-12000}" --test-per-lang 150 \
  --seed 1234 --augment 0.5 > "$RUNS/synth.log" 2>&1
echo "data: $(( $(date +%s) - start )) s"
n=$#
workers=$(( ( $(nproc) - n ) / n )); [ "$workers" -ge 1 ] || workers=1
pids=()
for spec in "$@"; do
  name=${spec%% *}; rest=${spec#"$name"}
  mkdir -p "$RUNS/$name"
  # package only, no .nemo, no offline evaluation: the package is evaluated afterwards through
  # the engine with train/evaluate.py
  # shellcheck disable=SC2086  # the variant's overrides are words on purpose
  python3 train/train.py --config train/config.yaml --out "$RUNS/$name" --no-eval --no-nemo data.dir="$DATA" \
    model.train_ds.num_workers=$workers model.validation_ds.num_workers=1 ${COMMON:-} $rest \
    > "$RUNS/$name/train.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || echo "run $i exited $?"; done
echo "all runs: $(( $(date +%s) - start )) s"
for spec in "$@"; do
  name=${spec%% *}
  echo "=== $name:${spec#"$name"}"
  grep -E '^\[(train|val|budget)\]|train (loss|trained)|Error' "$RUNS/$name/train.log" | tail -n 60 || true
done | tee "$OUT/sweep.log" | grep -vE '^\[train\]' || true
python3 - "$RUNS" "$OUT" "$@" <<'PY'
import json, os, shutil, sys
runs, out, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
summaries = {}
for spec in specs:
    name = spec.split()[0]
    try:
        with open(os.path.join(runs, name, "summary.json")) as f:
            summaries[name] = dict(json.load(f), overrides=spec.split()[1:])
    except OSError:
        summaries[name] = {"overrides": spec.split()[1:], "error": "no summary"}
scored = [(s["last_val"].get("val_wer", 9.9), n) for n, s in summaries.items() if s.get("last_val")]
best = min(scored)[1] if scored else None
with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump({"best": best, "runs": summaries}, f, indent=1)
print(json.dumps({n: s.get("last_val") for n, s in summaries.items()}), "best:", best)
if best:
    shutil.copytree(os.path.join(runs, best, "demo"), os.path.join(out, "best"), dirs_exist_ok=True)
PY
