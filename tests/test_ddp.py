"""ddp.py: under torchrun with 2 Gloo processes on the CPU, training follows the single-process trajectory."""
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


def torchrun(out_dir, **overrides):
    """train.py under torchrun with 2 processes (Gloo on the CPU), the flags of FLAGS plus overrides."""
    flags = {**FLAGS, "out_dir": str(out_dir), **overrides}
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


def test_two_gloo_processes_follow_the_single_process_trajectory_and_resume(tmp_path, crash_after_checkpoint):
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

    # a single-process run stopped after its checkpoint at step 3, resumed by 2 processes, ends where the straight run does
    crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(resolve_defaults(TrainConfig(**FLAGS, out_dir=str(tmp_path / "resumed"))))
    torchrun(tmp_path / "resumed", resume=True)
    assert_same_trajectory(log(tmp_path / "single"), log(tmp_path / "resumed"))
