"""train.py: pretraining lowers the loss, resuming continues the same trajectory, the CLI's contract."""
import json
import os
import subprocess
import sys

import pytest

import train
from train import TrainConfig, parse_args, resolve_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pretrain_config(out_dir, **overrides):
    settings = dict(init_from="scratch", dataset="stdlib", out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=64,
                    batch_size=8, max_iters=30, eval_interval=10, learning_rate=3e-3, progress=False, device="cpu")
    settings.update(overrides)
    return resolve_defaults(TrainConfig(**settings))


def test_pretraining_lowers_validation_loss(tmp_path):
    summary = train.train(tiny_pretrain_config(tmp_path))
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0  # from ~5.5 (uniform over 257) downwards
    for name in ("ckpt.pt", "log.csv", "loss.png", "summary.json"):
        assert (tmp_path / name).exists()
    model, tokenizer_name = train.load_checkpoint_model(str(tmp_path))
    assert tokenizer_name == "bytes" and model.config.n_embd == 32


def test_resume_continues_the_identical_trajectory(tmp_path, monkeypatch):
    straight = train.train(tiny_pretrain_config(tmp_path / "straight", max_iters=20, dropout=0.1))
    straight_log = json.load(open(tmp_path / "straight" / "summary.json"))
    assert straight_log["steps"] == 20

    real_save = train.save_checkpoint

    def save_then_crash(*args, **kwargs):  # simulate a crash right after the checkpoint at step 10
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_pretrain_config(tmp_path / "resumed", max_iters=20, dropout=0.1))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = train.train(tiny_pretrain_config(tmp_path / "resumed", max_iters=20, dropout=0.1, resume=True))

    import csv

    losses = lambda d: [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / d / "log.csv"))]
    assert len(losses("resumed")) == 20
    assert losses("resumed") == losses("straight")  # bit for bit, dropout included
    assert resumed["val_loss_after"] == straight["val_loss_after"]


def test_help_lists_every_flag_with_its_default_and_unknown_flags_fail():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--lora_rank", "--lora_alpha", "--lora_targets", "--quantize", "--init_from", "--resume", "--device", "--mask_prompt"):
        assert flag in out
    assert "(default: 8)" in out and "(default: q,v)" in out
    bad = subprocess.run([sys.executable, "train.py", "--lora_rnak", "4"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unrecognized arguments: --lora_rnak" in bad.stderr


def test_parse_args_types():
    cfg = parse_args(["--lora_rank", "4", "--lora_alpha", "8", "--mask_prompt", "--no-progress"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.mask_prompt, cfg.progress) == (4, 8.0, True, False)


def test_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="--finetune lora"):
        train.check_config(TrainConfig(finetune="full", quantize="nf4"))
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        train.check_config(TrainConfig(finetune="adapter"))
    with pytest.raises(ValueError, match="--init_from scratch --dataset stdlib"):
        train.check_config(TrainConfig(init_from="scratch", dataset="embedded"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.load_checkpoint_model("/nonexistent/ckpt.pt")
