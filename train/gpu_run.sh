#!/usr/bin/env bash
# Trains the demo model on the GPU host (one H100, Python 3.12, no network) in about 9 minutes:
# installs the carried wheels (.whl/: NeMo's, from shared/device/fetch-wheels.sh, plus
# espeakng-loader), synthesizes the data there, trains with train/config.yaml within its time
# budget, and copies the model package, summary and log to $OUT.
#   bash train/gpu_run.sh [train/train.py options and key=value overrides]
# The open-vocabulary model (train/results/RESULTS.md): write the texts first where wordfreq is
# installed (train/open_text.py), then pass --override train/config_open.yaml --warm-start <package>
# --snapshot-to "$OUT/snapshot" --deadline <unix time> data.texts=<that file>.
# To continue an earlier run (a second command of the same length), carry its package folder
# and pass --init-from that/folder (optionally optim.sched.warmup_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: a local dry run in an environment that has it all
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN=${RUN_DIR:-/tmp/demo_run} DATA=${DATA_DIR:-/tmp/demo_data}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
nvidia-smi -L || true
start=$(date +%s)
set +e
python3 train/train.py --config train/config.yaml --out "$RUN" data.dir="$DATA" "$@" \
  > "$OUT/train.log" 2>&1
rc=$?
set -e
grep -E '^\[(train|val|budget)\]|^wrote|train (data|tokenizer|loss|model|init|trained|wrote)|Error|error' "$OUT/train.log" | tail -n 80 || true
grep -A 26 '^\[profile\]' "$OUT/train.log" || true
echo "train.py exit $rc after $(( $(date +%s) - start )) s"
if [ -d "$RUN/demo" ]; then
  cp -r "$RUN/demo" "$OUT/demo"
  cp "$RUN/summary.json" "$OUT/" 2>/dev/null || true
  ls -la "$OUT" "$OUT/demo"
  cat "$OUT/summary.json" 2>/dev/null || true
fi
exit $rc
