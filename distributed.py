"""torchrun's plumbing: this process's rank, the process group, and the few collectives that training and sampling
need. A plain run (no WORLD_SIZE in the environment) never starts a process group: every function then does the
one-process thing."""
import atexit
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def rank_and_world():
    """(rank, world size) of this process, from the RANK and WORLD_SIZE that torchrun sets; (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device):
    """Under torchrun, join its process group (once; left at exit) and return this rank's device: GPU LOCAL_RANK with
    nccl on CUDA, the CPU with gloo otherwise. A plain run (no WORLD_SIZE in the environment) starts nothing."""
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
        atexit.register(dist.destroy_process_group)
    return device


def share(n):
    """This rank's contiguous block of n items (images to draw, examples of a batch): all n in a plain run."""
    rank, world = rank_and_world()
    return slice(n * rank // world, n * (rank + 1) // world)


def mean_over_ranks(tensor):
    """The mean over ranks of tensor, reduced in place (NaN on one rank is NaN on all); tensor itself in a plain run."""
    world = rank_and_world()[1]
    if world > 1:
        dist.all_reduce(tensor)
    return tensor / world if world > 1 else tensor


def max_over_ranks(value, device):
    """The largest of every rank's integer value (a signal number, 0 for none); value itself in a plain run."""
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_on_main(obj):
    """Every rank's obj in rank order on rank 0, None on the others; [obj] in a plain run. Every rank must call it."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block (a download, say) before the other ranks do, so they never race on a file."""
    rank, world = rank_and_world()
    if rank > 0:
        dist.barrier()
    yield
    if rank == 0 and world > 1:
        dist.barrier()
