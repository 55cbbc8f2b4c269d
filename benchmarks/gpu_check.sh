#!/usr/bin/env bash
# Every GPU number minitpo keeps, with one command, in about 8 minutes on an H100 or H200:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default gpu_check/; OUT_DIR/SUMMARY.md at the end
#   SIZE=tiny bash benchmarks/gpu_check.sh        # the same steps at toy sizes: a smoke run, CPU too
#
# 1. engine_check  the engine's eager, CUDA-graph and compiled paths give generate's greedy tokens
# 2. sample        the engine at 256 sequences x 1,024 new tokens, Qwen2.5-1.5B shape, NF4 + LoRA
# 3. train_step    one DPO step, lean vs full logits, 8 pairs x 1,024 tokens, Qwen2.5-1.5B shape, NF4
# 4. judge         a tiny GGUF judge with every layer on the GPU (llama.cpp), pointwise and pairwise
# 5. loop          two whole iterations at the Qwen2.5-1.5B shape (benchmarks/loop.py), stage times
#                  and peak memory, sampling capped at 8 GB so that everything fits a 12 GB card
# Each step's output is OUT_DIR/<step>.txt; a failed step is reported and the next one runs.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
SIZE=${SIZE:-full}
mkdir -p "$OUT"
summary="$OUT/SUMMARY.md"
{
  echo "# minitpo GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: $(uname -m) CPU"
  python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  echo
} > "$summary"

step() {  # step NAME LINES-TO-KEEP COMMAND...
  local name=$1 keep=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  { echo "## $name ($((SECONDS - t0)) s, exit $rc)"; echo; echo '```'; echo "$*";
    tr '\r' '\n' < "$OUT/$name.txt" | grep -v -E '[0-9]+/[0-9]+ \[|it/s\]|s/it\]|^\s*$' | tail -n "$keep"; echo '```'; echo; } >> "$summary"
  [ $rc -eq 0 ] || echo "   $name failed (exit $rc): see $OUT/$name.txt"
}

if [ "$SIZE" = tiny ]; then
  dev=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  step engine_check 8 python benchmarks/engine_check.py --device "$dev"
  step sample 8 python benchmarks/sample.py --shape tiny --device "$dev" --batch 16 --new-tokens 32 --skip-generate
  step train_step 12 python benchmarks/train_step.py --shape tiny --batch 2 --seq-len 128 --steps 2 --rounds 1
  step judge 12 python benchmarks/judge.py --gguf recipes/tiny/judge.gguf --n 8 --k 4 --pairwise-n 2
  step loop 8 python benchmarks/loop.py --shape tiny --per-iteration 4 --max-new-tokens 64 --stop-every 16 \
    --quant none --json "$OUT/loop.json"
else
  step engine_check 8 python benchmarks/engine_check.py
  step sample 8 python benchmarks/sample.py --shape qwen1.5b --batch 256 --new-tokens 1024 --skip-generate --graphs-only
  step train_step 12 python benchmarks/train_step.py --shape qwen1.5b --quant nf4 --batch 8 --seq-len 1024 --steps 3 --rounds 2
  step judge 12 python benchmarks/judge.py --gguf recipes/tiny/judge.gguf --n 64 --k 8 --n-gpu-layers -1
  step loop 8 python benchmarks/loop.py --shape qwen1.5b --per-iteration 32 --memory-gb 8 --json "$OUT/loop.json"
fi
echo "summary: $summary"
