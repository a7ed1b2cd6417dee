#!/usr/bin/env bash
# The GPU tier: CUDA blocks, NCCL at world 1, CUDA training parity, DCP of CUDA blocks,
# the demo's EmbeddingBag model, gloo with CUDA tensors (tests/test_cuda.py), then the
# demo itself on NCCL. Runs with this Python's torch, which must be a CUDA build
# (installing the package keeps it: the torch range is already satisfied). Fails, rather
# than skipping, when no CUDA device is visible.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
pip install -q "$root[dev]"
# From a scratch folder: the installed package is tested, not the checkout.
cd "$(mktemp -d)"
python -m pytest "$root/tests/test_cuda.py" -m cuda -q -rs
python -m dispatch_shard.demo --ranks 1 --backend nccl --steps 10
