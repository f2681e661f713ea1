"""ddp.py: under torchrun with 2 Gloo processes on the CPU, training follows the single-process trajectory: pretraining
from the start, and a QLoRA fine-tuning (LoRA adapters on a 4-bit base) resumed by 2 processes from a 1-process
checkpoint. (benchmarks/gpu_check.py runs 2 NCCL processes where a machine has 2 GPUs.)"""
import csv
import os
import subprocess
import sys

import pytest

import train
from support.ddp import World
from train import TrainConfig, resolve_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = dict(init_from="scratch", dataset="stdlib", n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=4, grad_accum=4,
             max_iters=6, eval_interval=3, eval_batches=2, learning_rate=3e-3, device="cpu", progress=False)


def test_each_rank_takes_every_nth_micro_batch():
    assert World(rank=0, size=2).micro_batches(6) == [0, 2, 4]
    assert World(rank=1, size=2).micro_batches(6) == [1, 3, 5]
    assert World().micro_batches(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="--grad_accum 5 must be a multiple of the 2 processes"):
        World(rank=0, size=2).micro_batches(5)


def torchrun(out_dir, flags=FLAGS, **overrides):
    """train.py under torchrun with 2 processes (Gloo on the CPU), the flags of `flags` (FLAGS) plus overrides."""
    flags = {**flags, "out_dir": str(out_dir), **overrides}
    argv = []
    for key, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *argv],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def log(out_dir):
    return list(csv.DictReader(open(os.path.join(out_dir, "log.csv"))))


def assert_same_trajectory(one, two):
    assert [r["iter"] for r in one] == [r["iter"] for r in two]
    for a, b in zip(one, two):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5, abs=1e-6)
        assert (a["val_loss"] == "") == (b["val_loss"] == "")
        if a["val_loss"] != "":
            assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=1e-5, abs=1e-6)
        assert a["tokens"] == b["tokens"]  # the same global batch


def test_two_gloo_processes_follow_the_single_process_trajectory(tmp_path):
    single = train.train(resolve_defaults(TrainConfig(**FLAGS, out_dir=str(tmp_path / "single"))))
    result = torchrun(tmp_path / "ddp")
    assert result.stdout.count("validation loss before training") == 1  # only rank 0 speaks
    assert_same_trajectory(log(tmp_path / "single"), log(tmp_path / "ddp"))
    import json

    import torch

    # AdamW's update hardly depends on the gradient's scale, but its first moment does: the gradients were the same
    ckpts = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("single", "ddp")]
    moments = [[s["exp_avg"] for s in c["optimizer"]["state"].values()] for c in ckpts]
    assert len(moments[0]) == len(moments[1]) > 0
    for a, b in zip(*moments):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-7)
    # Summing the micro-batches' gradients in another order changes them by float rounding, and Adam's normalised step
    # (m / sqrt(v)) turns that into up to ~2e-6 for a weight whose gradient is near zero: still 1,000 times below one
    # step (lr 3e-3), so a rank that skipped or repeated a micro-batch would fail this.
    for name, weight in ckpts[0]["model"].items():
        assert torch.allclose(weight, ckpts[1]["model"][name], rtol=1e-4, atol=1e-5), name

    assert json.load(open(tmp_path / "ddp" / "summary.json"))["val_loss_after"] == pytest.approx(single["val_loss_after"], rel=1e-5)


def test_a_qlora_run_resumed_by_two_processes_follows_the_single_process_trajectory(tmp_path, crash_after_checkpoint):
    """DDP with adapters on a frozen 4-bit base: only LoRA's A and B are all-reduced, the packed 4-bit buffers are the
    same on both ranks. A 1-process QLoRA run stopped after its checkpoint at step 2, resumed by 2 processes, ends where
    the uninterrupted single-process run does: losses, and the adapter that the last checkpoint holds."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=2, n_head=2, n_embd=32, smear_keys=True))
    torch.save({"model_config": vars(base.config).copy(), "tokenizer": "bytes",
                "model": {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}}, tmp_path / "base.pt")
    qlora = dict(init_from=str(tmp_path / "base.pt"), dataset="embedded", quantize="nf4", lora_rank=4, lora_targets="q,v,mlp_in",
                 batch_size=4, grad_accum=4, max_iters=4, eval_interval=2, eval_batches=2, answer_limit=2, num_samples=0,
                 max_new_tokens=4, learning_rate=3e-3, device="cpu", progress=False)
    train.train(resolve_defaults(TrainConfig(**qlora, out_dir=str(tmp_path / "single"))))
    crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(resolve_defaults(TrainConfig(**qlora, out_dir=str(tmp_path / "resumed"))))
    torchrun(tmp_path / "resumed", qlora, resume=True)
    assert_same_trajectory(log(tmp_path / "single"), log(tmp_path / "resumed"))
    adapters = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["trainable"] for d in ("single", "resumed")]
    assert adapters[0].keys() == adapters[1].keys() and all("lora_" in name for name in adapters[0])
    for name, tensor in adapters[0].items():
        assert torch.allclose(tensor, adapters[1][name], rtol=1e-4, atol=1e-5), name
