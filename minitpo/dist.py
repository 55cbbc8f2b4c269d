"""Several processes, one run: what `torchrun --nproc-per-node N -m minitpo run RECIPE` needs.

One process (no torchrun) is the default, and then every function here is a no-op or an identity.
Under torchrun (WORLD_SIZE > 1) `init` joins the process group: gloo on CPU, nccl on GPUs with one
device per rank (LOCAL_RANK, made the current device, so "cuda" everywhere else means the rank's own). The loop then splits each stage's work by `shard` (every world_size-th
item, from the rank's own), puts the results back in one-process order with `gather`, and lets rank
0 alone write the run directory; the others read what it wrote after a `barrier`. Training all-reduces
the gradients (minitpo.train), so every rank holds the same adapter.

Needs a file system every rank sees (one machine: always).
"""

import os

import torch
import torch.distributed as td

from minitpo.errors import UserError


def init() -> None:
    """Join torchrun's process group once, if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl")
    else:
        td.init_process_group("gloo")


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def shard(items: list) -> list:
    """This rank's share: items rank, rank + world_size, ..."""
    return items[rank()::world_size()]


def gather(mine: list) -> list:
    """Every rank's `shard` results, back in the order of the items they came from (any picklable)."""
    n = world_size()
    if n == 1:
        return list(mine)
    parts = [None] * n
    td.all_gather_object(parts, list(mine))
    out = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        out[r::n] = part
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """fn() on rank 0 alone (setup, writing), its result on every rank. A UserError there is raised on
    every rank, so the others stop in the same one line instead of waiting at the next collective."""
    if world_size() == 1:
        return fn()
    if not is_main():
        status, value = broadcast(None)
        if status == "error":
            raise UserError(value)
        return value
    try:
        result = fn()
    except UserError as e:
        broadcast(("error", str(e)))
        raise
    except BaseException:
        broadcast(("error", "another process failed; see its traceback"))
        raise
    broadcast(("ok", result))
    return result


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place."""
    if world_size() > 1:
        td.all_reduce(tensor)
    return tensor


def all_reduce_grads_(params) -> None:
    """Sum the gradients of `params` over the ranks, in one flat all-reduce (what DDP does, spelled
    out: minitpo.logps calls the model's body directly, around DDP's forward). A parameter without a
    gradient on this rank (it had no pairs in the batch) contributes zeros."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    td.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def close() -> None:
    if td.is_initialized():
        td.destroy_process_group()
