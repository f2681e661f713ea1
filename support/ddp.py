"""
Data-parallel training over several processes, GPUs or machines: torchrun + PyTorch DistributedDataParallel (DDP),
as nanoGPT does it.

    torchrun --standalone --nproc_per_node=4 train.py --grad_accum 8 ...            # one machine, 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py ...

torchrun starts one process per GPU (or per CPU worker) and tells each its RANK, LOCAL_RANK and WORLD_SIZE in the
environment. Every process holds a full copy of the model; DDP averages the gradients across processes during
backward (an all-reduce, over NCCL on CUDA and Gloo on the CPU), so the copies take identical optimizer steps.

How the batch is shared: --batch_size is the size of one micro-batch and --grad_accum the number of micro-batches in
one optimizer step, counted over all processes. Rank r computes micro-batches r, r + N, r + 2N, ... of the N
processes' shared list, so a single process with the same flags sees exactly the same data, and the loss trajectory
is the same up to float rounding (the sum of the gradients is taken in another order). Each rank scales its loss by
N / grad_accum: DDP's average over N ranks then gives the mean over all grad_accum micro-batches. Gradients are only
exchanged on a rank's last micro-batch (`no_sync` before it), so accumulation costs no extra communication.

Evaluation is shared the same way: each rank scores every N-th validation batch and answers every N-th test example,
and the sums and answers are gathered (mean_token_loss, answer_examples), so no rank waits in a collective while
another evaluates alone (a wait longer than the process group's timeout would end the run). Only rank 0 logs, prints,
and writes checkpoints and adapters; every rank reads the checkpoint on --resume (so on several machines out_dir must
be on a file system they share).
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class World:
    """This process's place among the training processes (rank 0 of 1 when not started by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def micro_batches(self, grad_accum):
        """The micro-batch indices of one optimizer step that this rank computes: rank, rank + size, ..."""
        if grad_accum % self.size:
            raise ValueError(f"--grad_accum {grad_accum} must be a multiple of the {self.size} processes, so each computes the same number of micro-batches")
        return list(range(self.rank, grad_accum, self.size))

    def wrap(self, model):
        """The model wrapped in DDP (the model itself for one process)."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if torch.cuda.is_available() and next(model.parameters()).is_cuda else None)

    def sync_unless(self, run_model, last):
        """Inside, backward all-reduces gradients only when `last` (the rank's last micro-batch of the step)."""
        return nullcontext() if self.size == 1 or last else run_model.no_sync()

    def sum(self, *values):
        """Each value summed over all ranks (floats in, floats out; no communication for one process)."""
        if self.size == 1:
            return values
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def mean_token_loss(self, model, batches, device):
        """support.loss.mean_token_loss over all the batches, each rank scoring batches rank, rank + size, ...: the sums
        of losses and of target tokens are added up over the ranks (the same mean, summed in another order)."""
        from support.loss import mean_token_loss

        if self.size == 1:
            return mean_token_loss(model, batches, device)
        mine = batches[self.rank :: self.size]
        count = sum(int((y != -100).sum()) for _, y in mine)
        total = mean_token_loss(model, mine, device) * count if count else 0.0
        total, count = self.sum(total, count)
        if count == 0:
            raise ValueError("no target tokens to evaluate on: an empty split, or every target masked")
        return total / count

    def answer_examples(self, model, tokenizer, examples, device, max_new_tokens, template):
        """support.instructions.answer_examples over all the examples, each rank answering examples rank, rank + size,
        ...; every rank gets all the answers, in order (greedy answers do not depend on which rows share a batch)."""
        from support.instructions import answer_examples

        if self.size == 1:
            return answer_examples(model, tokenizer, examples, device, max_new_tokens, template)
        import torch.distributed as dist

        mine = answer_examples(model, tokenizer, examples[self.rank :: self.size], device, max_new_tokens, template)
        gathered = [None] * self.size
        dist.all_gather_object(gathered, mine)
        answers = [None] * len(examples)
        for rank, theirs in enumerate(gathered):
            answers[rank :: self.size] = theirs
        return answers

    def close(self):
        if self.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_world(device):
    """Join the process group when started by torchrun (RANK in the environment): NCCL for device 'cuda' (this process
    then uses GPU LOCAL_RANK), Gloo for 'cpu'. Without torchrun: a World of one process, nothing to join."""
    if "RANK" not in os.environ:
        return World()
    world = World(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]), size=int(os.environ["WORLD_SIZE"]))
    if device not in ("cuda", "cpu"):
        raise ValueError(f"torchrun data parallelism runs on 'cuda' (NCCL) or 'cpu' (Gloo), not {device!r}: pass --device cuda or --device cpu")
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(world.local_rank)  # "cuda" now means this process's GPU
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if not world.is_main:  # one voice: the other ranks' prints would repeat rank 0's (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    return world
