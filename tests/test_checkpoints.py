"""checkpoints.py: an interrupted pretraining of the tiny base is finished by train.py in a child process (with the
settings it was started with), and a finished one is loaded as it is."""
import csv

import pytest

import checkpoints
import train
from train import TrainConfig, resolve_defaults


def test_an_interrupted_tiny_base_is_finished_by_train_py_then_loaded(tmp_path, monkeypatch, crash_after_checkpoint):
    base_dir = tmp_path / "tiny-base"
    settings = dict(init_from="scratch", dataset="stdlib", out_dir=str(base_dir), n_layer=1, n_head=2, n_embd=16, block_size=32,
                    batch_size=4, max_iters=4, eval_interval=2, eval_batches=1, progress=False, device="cpu")
    crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(resolve_defaults(TrainConfig(**settings)))
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(base_dir))

    assert checkpoints.ensure_tiny_base("cpu") == str(base_dir / "ckpt.pt")
    log = list(csv.DictReader(open(base_dir / "log.csv")))
    assert [int(r["iter"]) for r in log] == [1, 2, 3, 4]  # resumed at step 2, not started again
    model, tokenizer_name = checkpoints.load_base_model("tiny")
    assert tokenizer_name == "bytes" and (model.config.n_layer, model.config.n_embd) == (1, 16)  # the shape it was started with
    finished = (base_dir / "ckpt.pt").stat().st_mtime_ns
    checkpoints.ensure_tiny_base("cpu")
    assert (base_dir / "ckpt.pt").stat().st_mtime_ns == finished  # done: nothing runs again
