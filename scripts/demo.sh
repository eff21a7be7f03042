#!/usr/bin/env bash
# The README main job: on a fresh machine, set up (idempotent) and train a small binary-weight ResNet VAE on the
# built-in photos through a local Ray cluster with 2 DeepSpeed workers on CPU for a few minutes, printing
# falling bits/dim, then write a grid of samples and evaluate the held-out split.
#
#   bash scripts/demo.sh                 # STEPS=3000 by default (about 4 minutes on 2 cores); extra args: overrides
#   STEPS=300 bash scripts/demo.sh train.batch_size=64
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# DeepSpeed JIT-compiles a small shared-memory comm op on first use (about a minute on 2 cores); cache it.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dbgen-torch-extensions}"
STEPS="${STEPS:-3000}"
NAME="demo-$(date +%Y%m%d-%H%M%S)"
every=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))
.venv/bin/python -m dbgen.train --config configs/rvae_binary_tiny.yaml --name "$NAME" --storage runs \
  scale.num_workers=2 train.max_steps="$STEPS" train.log_every=100 \
  train.eval_every="$every" train.sample_every="$every" train.checkpoint_every="$every" "$@"
.venv/bin/python -m dbgen.sample --run "runs/$NAME" --n 64 --out "runs/$NAME/samples.png"
.venv/bin/python -m dbgen.evaluate --run "runs/$NAME" --max-batches 4
echo "run directory: runs/$NAME (metrics.jsonl, summary.json, samples/, checkpoint_*)"
