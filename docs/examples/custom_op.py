"""A custom op of your own, sharded: torch.library op + autograd + a per-block rule.

Run it with:  torchrun --nproc-per-node 2 docs/examples/custom_op.py
"""

import torch
import torch.distributed as dist

import dispatch_shard as ds


# 1. An ordinary torch.library op with its derivative (nothing sharded yet).
@torch.library.custom_op("demo::soft_clip", mutates_args=())
def soft_clip(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 3


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 3 * (1 - torch.tanh(x) ** 2)


torch.library.register_autograd("demo::soft_clip", backward, setup_context=setup_context)


# 2. Its sharded implementation: elementwise, so each block is computed on its own.
#    It never sees summands of a Partial tensor: those are reduced before it runs.
@ds.custom_sharded_op_impl(torch.ops.demo.soft_clip.default)
def sharded_soft_clip(types, args, kwargs, process_group):
    x = args[0]
    return x.with_blocks([soft_clip(block) for block in x.local_blocks()])


def main():
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same dense values on every rank
    dense = torch.randn(6, 4)
    rows = ds.ChunkShardingSpec(0, [f"rank:{r}/cpu" for r in range(world)])
    x = ds.ShardedTensor.from_replicated(dense, rows).requires_grad_()

    y = soft_clip(x)              # forward: block by block, no communication
    y.sum().backward()            # backward: the registered derivative, on ShardedTensors

    reference = dense.clone().requires_grad_()
    soft_clip(reference).sum().backward()
    torch.testing.assert_close(y.full_tensor(), soft_clip(dense))
    torch.testing.assert_close(x.grad.full_tensor(), reference.grad)
    if dist.get_rank() == 0:
        print("soft_clip: sharded value and gradient equal dense")
        print(ds.debug.where(torch.ops.demo.soft_clip.default).split(" at ")[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
