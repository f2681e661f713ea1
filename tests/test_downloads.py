"""The downloaded instruction datasets, run offline: `--dataset instruction-data` and `--dataset alpaca` fetch their
file once into data/downloads (here a temporary folder, from file:// URLs standing in for the canonical ones) through
support.files.download_file, then train like any local file. (The SMS Spam Collection's zip: test_sms_data.py.)"""

import json

import pytest
import torch
from conftest import shared_data

import train
from model import GPT, GPTConfig
from support import instruction_files
from train import TrainConfig, resolve_defaults


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """Point the dataset downloads at tmp_path/downloads; returns a function that serves a file under a dataset name."""
    monkeypatch.setattr(instruction_files, "DOWNLOAD_DIR", str(tmp_path / "downloads"))

    def serve(name, path):
        monkeypatch.setitem(
            instruction_files.DATASETS, name, ("file://" + str(path), instruction_files.DATASETS[name][1])
        )
        return tmp_path / "downloads" / instruction_files.DATASETS[name][1]

    return serve


def test_instruction_data_is_downloaded_once_and_trains(downloads, tmp_path):
    source = shared_data("instruction-data.json")  # LLMs-from-scratch's 1,100 examples, as its URL serves them
    target = downloads("instruction-data", source)
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    torch.save(
        {
            "model_config": vars(base.config).copy(),
            "tokenizer": "bytes",
            "model": {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"},
        },
        tmp_path / "base.pt",
    )
    cfg = TrainConfig(
        init_from=str(tmp_path / "base.pt"),
        dataset="instruction-data",
        out_dir=str(tmp_path / "run"),
        lora_rank=2,
        batch_size=4,
        max_iters=2,
        eval_interval=2,
        eval_batches=1,
        answer_limit=2,
        num_samples=0,
        max_new_tokens=4,
        progress=False,
        device="cpu",
    )
    summary = train.train(resolve_defaults(cfg))
    assert target.read_bytes() == open(source, "rb").read()  # the whole file, under its canonical name
    assert not target.with_name(target.name + ".part").exists()
    assert (
        summary["dataset"] == "instruction-data" and 900 <= summary["train_examples"] <= 935
    )  # 85% of 1,100, long ones dropped
    assert "test_exact_match_after" in summary and "test_accuracy_after" not in summary  # no key answers in this set
    downloads("instruction-data", tmp_path / "gone.json")  # the URL no longer serves anything: the copy is used
    assert len(instruction_files.load_examples("instruction-data")) == 1100


def test_alpaca_is_downloaded_once_and_read(downloads, tmp_path):
    examples = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(30)]
    examples[3]["input"] = "Show the sum only."
    served = tmp_path / "served.json"
    served.write_text(json.dumps(examples))
    target = downloads("alpaca", served)
    assert instruction_files.load_examples("alpaca") == examples
    assert target.name == "alpaca_data.json" and json.loads(target.read_text()) == examples
    served.unlink()
    assert instruction_files.load_examples("alpaca") == examples  # read from data/downloads, not fetched again
    served.write_text("[")  # a bad file at the URL is never fetched again either; a bad local copy is named
    target.write_text("[")
    with pytest.raises(ValueError, match="alpaca_data.json is not valid JSON"):
        instruction_files.load_examples("alpaca")
