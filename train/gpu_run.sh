#!/usr/bin/env bash
# Trains the demo model on the GPU host (one H100, Python 3.12, no network) in about 8 minutes:
# installs the carried wheels (.whl/: NeMo's, from shared/device/fetch-wheels.sh, plus
# espeakng-loader), synthesizes the data there, trains with train/config.yaml within its time
# budget, and copies the model package, summary and log to $OUT.
#   bash train/gpu_run.sh [key=value overrides for train/train.py]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
nvidia-smi -L || true
start=$(date +%s)
set +e
python3 train/train.py --config train/config.yaml --out /tmp/demo_run data.dir=/tmp/demo_data "$@" \
  > "$OUT/train.log" 2>&1
rc=$?
set -e
grep -E '^\[(train|val|budget)\]|^wrote|train (data|tokenizer|loss|model|trained|wrote)|Error|error' "$OUT/train.log" | tail -n 80 || true
echo "train.py exit $rc after $(( $(date +%s) - start )) s"
if [ -d /tmp/demo_run/demo ]; then
  cp -r /tmp/demo_run/demo "$OUT/demo"
  cp /tmp/demo_run/summary.json "$OUT/" 2>/dev/null || true
  ls -la "$OUT" "$OUT/demo"
  cat "$OUT/summary.json" 2>/dev/null || true
fi
exit $rc
