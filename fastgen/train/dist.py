"""Rank, world size and device of a training process, and the collectives the loop and the families use."""
import os

import torch
import torch.distributed as dist

from fastgen.train.common import TrainError


class Dist:
    """Rank, world size and device of this process; a process group when torchrun launched it."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        cuda = torch.cuda.is_available()
        if device_arg is None:
            device_arg = "cuda" if cuda else "cpu"
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise TrainError(f"--device must be cpu or cuda[:N], got {device_arg!r}")
        if device.type == "cuda":
            if not cuda:
                raise TrainError("--device cuda: no CUDA device is available (this torch "
                                 f"{'has no CUDA' if torch.version.cuda is None else 'sees no GPU'})")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.launched else torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        self.group = False
        if self.launched:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.group = True

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensor):
        """Sum over the ranks, in place (a no-op in a single process)."""
        if self.group:
            dist.all_reduce(tensor)
        return tensor

    def max(self, tensor):
        """Maximum over the ranks, in place (a no-op in a single process)."""
        if self.group:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.group:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, models):
        """Every model's buffers (BatchNorm's running statistics) from rank 0, in place. DDP broadcasts them at
        the start of a wrapped forward, so they drift apart in that forward and in unwrapped ones (a GAN's
        no-grad generator pass): the loop calls this before an evaluation and at the end, so that every rank
        evaluates, and ends with, rank 0's model."""
        if self.group:
            for model in models:
                for b in model.buffers():
                    dist.broadcast(b, 0)

    def barrier(self):
        if self.group:
            dist.barrier()

    def close(self):
        if self.group:
            dist.destroy_process_group()
            self.group = False
