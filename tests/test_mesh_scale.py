"""FSDP x TP on a 2x512 mesh of fake ranks: per-rank state is dense/1024, and no op makes
a full-size weight (the peak memory of the process stays below one weight).

The mesh is torch's fake process group (one process plays rank 0 of 1024; collectives
move nothing), so this checks layouts and memory, not values: the values of N-D
training are checked against dense on 4 real ranks in test_mesh_nd.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r'''
import json, resource
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.testing._internal.distributed.fake_pg import FakeStore
import dispatch_shard as ds
from dispatch_shard.examples import MLP
from dispatch_shard.specs import MeshShardingSpec

WORLD, M, H, B = 1024, 2048, 8192, 8
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
# Warm torch's kernels up (their first-use workspaces) on a small dense model.
warm = MLP(16, 64)
F.mse_loss(warm(torch.randn(8, 16)), torch.randn(8, 16)).backward()
torch.optim.AdamW(warm.parameters()).step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def on_mesh(*placements):  # ("dp", "tp") = (2, 512)
    return MeshShardingSpec((2, 512), tuple(range(WORLD)), placements)

dp_tp, dp_tp_cols = (("shard", 0), ("shard", 0)), (("shard", 0), ("shard", 1))
with torch.device("meta"):
    model = MLP(M, H)
with ds.unchecked_creation():  # (fake ranks exchange nothing to check)
    model.fc1.weight = torch.nn.Parameter(ds.randn(on_mesh(*dp_tp), H, M) * 0.01)
    model.fc1.bias = torch.nn.Parameter(ds.zeros(on_mesh(*dp_tp), H))
    model.fc2.weight = torch.nn.Parameter(ds.randn(on_mesh(*dp_tp_cols), M, H) * 0.01)
    model.fc2.bias = torch.nn.Parameter(ds.zeros(on_mesh(*dp_tp), M))
    batch = (("shard", 0), ("replicate", 0))
    x, y = ds.randn(on_mesh(*batch), B, M), ds.randn(on_mesh(*batch), B, M)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for _ in range(2):
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
state = [v for s in optimizer.state.values() for v in s.values()
         if isinstance(v, torch.Tensor) and v.dim() > 0]
grads = [p.grad for p in model.parameters()]
held = sum(b.numel() * b.element_size() for t in [*model.parameters(), *grads, *state]
           for b in t._local_tensors)
print(json.dumps({"dense": 4 * 4 * sum(p.numel() for p in model.parameters()),
                  "held": held, "peak_growth": peak - start, "weight": H * M * 4,
                  "placements": [p._layout.spec.placements for p in model.parameters()]}))
'''


def test_fsdp_x_tp_state_on_a_2x512_mesh_is_dense_over_1024() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    share = figures["held"] / (figures["dense"] / 1024)
    assert abs(share - 1) <= 0.01, figures
    # One full-size weight would be 64 MiB; the whole run grows the process by less.
    assert figures["peak_growth"] < figures["weight"], figures
