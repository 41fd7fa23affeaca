#!/usr/bin/env bash
# GPU check: install the GPU extras, build a ~100M-parameter policy locally (no download), run the
# default fit with the hf and the vllm samplers in bf16, and print the generation tokens/s of both and
# their ratio (issue 13 asks vllm >= 5x hf). Then scripts/gpu_check_strategies.py, where it exists.
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine, from the repository root
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh   # the same path on CPU at toy sizes, no install
#
# Knobs (environment): STEPS (RL steps per fit, 4), PROMPTS (prompts per step, 64), GROUP (8),
# NEW_TOKENS (256), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}
STEPS=${STEPS:-4}
WORK=$(mktemp -d -t le_gpu_check.XXXXXX)

if [ "$SMOKE" = 1 ]; then
    # CPU: fp32, a 64-wide policy (vLLM's CPU attention needs heads of 32+), a small KV cache
    PROMPTS=${PROMPTS:-8} GROUP=${GROUP:-4} NEW_TOKENS=${NEW_TOKENS:-16}
    SIZE="hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128"
    DEVICE=(trainer.accelerator=cpu model.dtype=float32)
    ENGINE=(sampler.kv_cache_gib=0.25)
else
    PROMPTS=${PROMPTS:-64} GROUP=${GROUP:-8} NEW_TOKENS=${NEW_TOKENS:-256}
    # 12 layers x (4 x 768^2 attention + 3 x 768 x 2560 MLP) = 99M parameters, 64-wide heads
    SIZE="hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2560"
    DEVICE=(trainer.accelerator=gpu trainer.devices=1 model.dtype=bfloat16 trainer.precision=bf16-true)
    ENGINE=()
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    # a machine without network keeps what it has; otherwise install the GPU extras
    if ! $PY -c "import vllm" 2>/dev/null; then
        $PY -m pip install --quiet --upgrade pip
        $PY -m pip install --quiet -e ".[dev,vllm]"
    fi
fi
$PY -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'vllm', vllm.__version__)"

POLICY="$WORK/policy"
$PY - "$POLICY" <<EOF
import sys
from lightning_entropy.models import build_char_tokenizer, build_tiny_model

tok = build_char_tokenizer()
model = build_tiny_model(len(tok), $SIZE, max_positions=512, seed=0)
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {sys.argv[1]}")
EOF

# the untrained policy rarely stops early, so every response is close to NEW_TOKENS long; the
# validation pass is kept small (it also builds the vLLM engine, before the first timed step)
COMMON=(
    "model.name_or_path=$POLICY" "${DEVICE[@]}"
    "trainer.max_steps=$STEPS" "data.prompts_per_step=$PROMPTS" "sampler.group_size=$GROUP"
    "sampler.max_new_tokens=$NEW_TOKENS" "algo.mini_batch_size=null"
    data.val_size=8 logging.val_samples=2 "logging.pass_k=[1,2]" "logging.val_every=1000"
    logging.progress=false logging.plot=false "logging.root=$WORK/runs"
)
for sampler in hf vllm; do
    extra=()
    [ "$sampler" = vllm ] && extra=(sampler.name=vllm "${ENGINE[@]}")
    echo "== fit with sampler.name=$sampler"
    $PY -m lightning_entropy fit "${COMMON[@]}" "logging.name=$sampler" "${extra[@]}" 2>&1 | tail -n 3
done

$PY - "$WORK/runs" <<'EOF'
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lightning_entropy.report import read_metrics


def tokens_per_s(run: Path) -> float:
    """Generated tokens / generation seconds over the RL steps after the first (warm-up)."""
    m = read_metrics(run)
    lengths = dict(m["train/response_len"])
    seconds = dict(m["time/generate"])
    steps = [s for s in sorted(seconds) if s > 0] or sorted(seconds)
    cfg = OmegaConf.load(run / "config.yaml")
    rows = cfg.data.prompts_per_step * cfg.sampler.group_size
    return sum(lengths[s] * rows for s in steps) / sum(seconds[s] for s in steps)


runs = Path(sys.argv[1])
hf, vllm = tokens_per_s(runs / "hf"), tokens_per_s(runs / "vllm")
mismatch = max(v for _, v in read_metrics(runs / "vllm")["rollout/mismatch_max_abs"])
print(f"generation tokens/s  hf: {hf:,.0f}  vllm: {vllm:,.0f}  ratio vllm/hf: {vllm / hf:.2f}")
print(f"largest |log pi_train - log pi_vllm| over the vllm run: {mismatch:.3g}")
EOF

if [ -f scripts/gpu_check_strategies.py ]; then
    echo "== scripts/gpu_check_strategies.py"
    $PY scripts/gpu_check_strategies.py
fi
