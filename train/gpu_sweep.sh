#!/usr/bin/env bash
# Several training runs side by side on one GPU host, each with its own overrides: the demo
# model's trainer is bound by one Python thread per step, so one H100 carries several at once.
# Synthesizes the data once, starts one train.py per variant (each with a share of the CPU
# cores for its data loader) writing into its own folder, and waits: package, summary and log in
# $OUT/<name>/ (the run's --out).
#   bash train/gpu_sweep.sh "name1 key=value ..." "name2 key=value ..." ...
# Options for every run go in COMMON (e.g. COMMON="--init-from runs/x/demo").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DATA=${DATA_DIR:-/tmp/demo_data} OUT=${OUT:-runs/sweep}
mkdir -p "$OUT"
nvidia-smi -L || true
start=$(date +%s)
python3 train/synth_data.py --out "$DATA" --train-per-lang "${TRAIN_PER_LANG:-12000}" --test-per-lang 150 \
  --seed 1234 --augment 0.5 > "$OUT/synth.log" 2>&1
echo "data: $(( $(date +%s) - start )) s"
n=$#
workers=$(( ( $(nproc) - n ) / n )); [ "$workers" -ge 1 ] || workers=1
pids=()
for spec in "$@"; do
  name=${spec%% *}; rest=${spec#"$name"}
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086  # the variant's overrides are words on purpose
  # each run writes straight into $OUT (package only, no .nemo, no offline evaluation: the
  # package is evaluated afterwards through the engine with train/evaluate.py)
  python3 train/train.py --config train/config.yaml --out "$OUT/$name" --no-eval --no-nemo data.dir="$DATA" \
    model.train_ds.num_workers=$workers model.validation_ds.num_workers=1 ${COMMON:-} $rest \
    > "$OUT/$name/train.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || echo "run $i exited $?"; done
echo "all runs: $(( $(date +%s) - start )) s"
for spec in "$@"; do
  name=${spec%% *}
  echo "=== $name:${spec#"$name"}"
  grep -E '^\[(val|budget)\]|train (loss|trained)|Error' "$OUT/$name/train.log" | tail -n 12 || true
  grep -E '^\[train\]' "$OUT/$name/train.log" | awk 'NR % 8 == 0' | tail -n 6 || true
  cat "$OUT/$name/summary.json" 2>/dev/null || true
done
