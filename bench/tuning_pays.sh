#!/usr/bin/env bash
# Does tuning pay on this GPU? One run, on the GPU machine, from the repository root:
#
#     . bench/gpu_env.sh && OUT=$OUT bash bench/tuning_pays.sh
#
# 1. the graph engine's timing of $MODEL on this GPU (bench/bundle_hardware.py --engine-only)
#    into a copy of the bundled h200 tables ($HW; flat copies of the entry land in $OUT);
# 2. ef-tune at each budget against those tables (the study runs on this machine's CPU, in
#    parallel; no validation, no report), configs in $OUT/tune-<budget>/config.yaml;
# 3. bench/validate_gpu.py: the 14 spread configs, ef-tune's choices and the untuned defaults
#    (expertflow.default_config: what a user gets without ef-tune) measured on the engine in
#    interleaved rounds, predicted beside measured, and each choice against its default.
set -euo pipefail
MODEL=${MODEL:-qwen2-moe}
OUT=${OUT:-/tmp/ef-pays}
BUDGETS=${BUDGETS:-"24GB 12GB 8GB"}
TRIALS=${TRIALS:-100}
ROUNDS=${ROUNDS:-3}
HW=${HW:-/tmp/ef-hw}
mkdir -p "$OUT" "$HW"
rm -rf "$HW/h200" && cp -r tuner/data/hardware/h200 "$HW/"
python3 bench/bundle_hardware.py --engine-only --models "$MODEL" --root "$HW" --json "$OUT/engine_bundle.json"
for f in "$HW/h200/$MODEL"/*; do cp "$f" "$OUT/bundle-$(basename "$f")"; done
extras=()
for b in $BUDGETS; do
  EXPERTFLOW_HARDWARE_DIR="$HW" python3 -c "import sys; from efcli.tune import main as tune_main; sys.exit(tune_main(sys.argv[1:]))" \
    --model "$MODEL" --budget "$b" --hardware h200 --trials "$TRIALS" --device cpu --no-validate \
    --no-report --out "$OUT/tune-$b" --force > "$OUT/tune-$b.log" 2>&1 &
  extras+=("$b:tuned=$OUT/tune-$b/config.yaml")
done
wait
for b in $BUDGETS; do tail -4 "$OUT/tune-$b.log"; done
python3 bench/validate_gpu.py --model "$MODEL" --hardware-dir "$HW" --rounds "$ROUNDS" --pays \
  --extra "${extras[@]}" --json "$OUT/validate.json"
