#!/usr/bin/env bash
# Thin torchrun wrapper for one node of a (multi-node) job; run it on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 CONFIG=configs/llama3_8b.yaml launch/run.sh optim.lr=2e-4
# Environment: CONFIG (default configs/tiny.yaml), NPROC (processes per node: GPUs, or 2 on CPU),
# NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500), PYTHON (python3).
# Extra arguments are passed to launch/train.py as key.path=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# Validate the config once, before any process starts: errors print cleanly, nothing is spawned.
"$PYTHON" launch/train.py --config "$CONFIG" --check "$@"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" \
  --nproc-per-node="$NPROC" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  launch/train.py --config "$CONFIG" "$@"
