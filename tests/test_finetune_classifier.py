"""finetune_classifier.py: a trained classifier is saved, reloaded and used from the command line; bad settings and
files are refused. (The data, the model and each mode's trainable parameters: test_classifier.py.)"""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import classifier
import finetune_classifier as fc
from model import GPT, GPTConfig
from quantize import Linear4bit
from safety import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0, block_size=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random 2-layer byte-level GPT saved in train.py's checkpoint format: loads like any --init_from path."""
    path = tmp_path_factory.mktemp("base") / "ckpt.pt"
    gpt = tiny_gpt()
    torch.save({"model_config": vars(gpt.config).copy(), "tokenizer": "bytes",
                "model": {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"}}, path)
    return str(path)


def write(tmp_path, text, name="sms.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def config(tiny_base, out_dir, **overrides):
    settings = dict(init_from=tiny_base, out_dir=str(out_dir), epochs=1, progress=False, device="cpu")
    settings.update(overrides)
    return fc.ClassifierConfig(**settings)


# ---------------------------------------------------------------------------------------------- training and use


def test_cached_and_uncached_training_runs_agree(tiny_base, tmp_path):
    """End to end: --cache_trunk (the default) and --no-cache_trunk train the same last_block classifier."""
    data = write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)))
    runs = [fc.train_classifier(config(tiny_base, tmp_path / str(cache), mode="last_block", data_path=data, batch_size=4, epochs=2,
                                       cache_trunk=cache)) for cache in (True, False)]
    assert (runs[0]["cached_blocks"], runs[1]["cached_blocks"]) == (1, 0)
    for key in ("train_loss", "val_loss", "test_loss"):
        assert runs[0][key] == pytest.approx(runs[1][key], abs=1e-5), key
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert runs[0][key] == runs[1][key], key


def test_lora_training_learns_the_sample_and_the_saved_classifier_reloads(tiny_base, tmp_path):
    summary = fc.train_classifier(config(tiny_base, tmp_path, epochs=2))
    for name in ("summary.json", "log.csv", "curves.png", "classifier.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("mode", "init_from", "lora_rank", "trainable_params", "total_params", "train_accuracy", "val_accuracy", "test_accuracy", "seconds"):
        assert key in saved, key
    assert saved["mode"] == "lora" and saved["lora_rank"] == 16 and saved["trainable_params"] < saved["total_params"]
    assert summary["test_accuracy_before"] < 0.7 and summary["test_accuracy"] > 0.85  # a random base, but the sample is easy
    assert sum(map(sum, summary["confusion_matrix"]["test"])) == summary["test_examples"] == 120
    assert summary["truncated_examples"] == 2  # two sample messages are longer than the 128-byte block
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 3  # header, before, 2 epochs

    model, tokenizer, info = fc.load_classifier(str(tmp_path))
    test = classifier.split_messages(classifier.balance_classes(classifier.load_messages()))[2]
    predictions = [classifier.classify(model, tokenizer, m.text, info["max_length"])[0] for m in test]
    accuracy = sum(p == classifier.LABELS[m.label] for p, m in zip(predictions, test)) / len(test)
    assert accuracy == pytest.approx(summary["test_accuracy"])  # the reloaded model is the trained one


@pytest.mark.parametrize("mode", ["qlora", "last_block"])
def test_other_modes_save_and_reload_what_they_trained(tiny_base, tmp_path, mode):
    data = write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)))
    summary = fc.train_classifier(config(tiny_base, tmp_path / "out", mode=mode, data_path=data, batch_size=4))
    assert summary["mode"] == mode and (summary["lora_rank"] is None) == (mode == "last_block")
    model, tokenizer, info = fc.load_classifier(str(tmp_path / "out"))
    assert any(isinstance(m, Linear4bit) for m in model.modules()) == (mode == "qlora")
    label, probability = classifier.classify(model, tokenizer, "WIN cash now 99", info["max_length"])
    assert label in classifier.LABELS and 0.5 <= probability <= 1.0


def test_a_classifier_refuses_a_base_that_changed_since_training(tmp_path):
    base = tmp_path / "base.pt"
    save = lambda seed: torch.save({"model_config": vars(tiny_gpt(seed).config).copy(), "tokenizer": "bytes",
                                    "model": {k: v for k, v in tiny_gpt(seed).state_dict().items() if k != "lm_head.weight"}}, base)
    save(seed=0)
    data = write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\tmessage {i}\n" for i in range(40)))
    fc.train_classifier(config(str(base), tmp_path / "out", mode="head", data_path=data))
    fc.load_classifier(str(tmp_path / "out"))  # the same base: fine
    save(seed=1)  # e.g. the tiny base pretrained again
    with pytest.raises(ValueError, match="not the one .* was trained on"):
        fc.load_classifier(str(tmp_path / "out"))


def test_bad_settings_are_clear_errors(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="--mode 'adapter'"):
        fc.train_classifier(config(tiny_base, tmp_path, mode="adapter"))
    with pytest.raises(ValueError, match="give only one"):
        fc.train_classifier(config(tiny_base, tmp_path, dataset="uci", data_path="x.tsv"))
    with pytest.raises(ValueError, match="--dataset 'imdb'"):
        fc.train_classifier(config(tiny_base, tmp_path, dataset="imdb"))
    with pytest.raises(ValueError, match="block_size 128"):
        fc.train_classifier(config(tiny_base, tmp_path, max_length=1000))
    with pytest.raises(FileNotFoundError, match="no classifier"):
        fc.load_classifier(str(tmp_path / "empty"))


def test_command_line_trains_and_classifies(tiny_base, tmp_path):
    out = str(tmp_path / "out")
    data = write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\t{'Claim your prize' if i % 2 else 'See you later'} {i}\n" for i in range(40)))
    run = lambda *args: subprocess.run([sys.executable, "finetune_classifier.py", *args], cwd=ROOT, capture_output=True, text=True)
    trained = run("--init_from", tiny_base, "--data_path", data, "--out_dir", out, "--mode", "head", "--epochs", "1", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    assert "head: 66 trainable" in trained.stdout and "confusion matrix" in trained.stdout  # 2 x 32 weights + 2 biases
    answer = run("--classify", "Claim your prize 7", "--out_dir", out)
    assert answer.returncode == 0, answer.stderr
    label, probability = answer.stdout.split()[0], float(answer.stdout.split("probability ")[1].rstrip(")\n"))
    assert label in classifier.LABELS and 0.5 <= probability <= 1.0
    with pytest.raises(FileNotFoundError, match="no classifier"):  # the script prints it as "error: ..." and exits 1
        fc.main(["--classify", "hello", "--out_dir", str(tmp_path / "nothing")])


def test_flags_mirror_the_config_and_unknown_flags_fail(capsys):
    with pytest.raises(SystemExit):
        fc.parse_args(["--help"])
    helped = capsys.readouterr().out
    for flag in ("--mode", "--init_from", "--dataset", "--data_path", "--lora_rank", "--lora_targets", "--epochs", "--classify"):
        assert flag in helped
    assert "(default: lora)" in helped and "(default: out/classifier)" in helped
    cfg = fc.parse_args(["--mode", "qlora", "--lora_rank", "4", "--learning_rate", "1e-3", "--no-progress"])
    assert (cfg.mode, cfg.lora_rank, cfg.learning_rate, cfg.progress) == ("qlora", 4, 1e-3, False)
    with pytest.raises(SystemExit):
        fc.parse_args(["--no_such_flag"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- hostile and careless inputs
# (issue 17) each test failed before the check it exercises existed


def two_class_file(tmp_path):
    return write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)))


class WritesMarker:
    """Unpickling this runs open(path, "w"): the file appears iff a loader unpickled arbitrary objects."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_loading_path_unpickles_objects_from_a_checkpoint(tiny_base, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    trap = {"iter": 1, "train_config": {"max_iters": 5}, "model": {}, "trap": WritesMarker(marker)}
    tiny_dir = tmp_path / "tiny-base"
    tiny_dir.mkdir()
    torch.save(trap, tiny_dir / "ckpt.pt")
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(tiny_dir))
    out = tmp_path / "out"
    fc.train_classifier(config(tiny_base, out, mode="head", data_path=two_class_file(tmp_path)))
    info = json.loads((out / "classifier.json").read_text())
    (out / "classifier.json").write_text(json.dumps({**info, "init_from": "tiny"}))  # trained on the (now booby-trapped) tiny base
    with pytest.raises(UserError, match="more than tensors and plain containers"):
        fc.train_classifier(config("tiny", tmp_path / "out2", mode="head", data_path=two_class_file(tmp_path)))
    assert not marker.exists(), "training from the tiny base ran code from its checkpoint"
    with pytest.raises(UserError, match="more than tensors and plain containers"):
        fc.main(["--classify", "hello", "--out_dir", str(out)])
    assert not marker.exists(), "--classify ran code from the tiny base's checkpoint"
    torch.save(trap, out / "classifier.pt")
    (out / "classifier.json").write_text(json.dumps({**info, "weights_sha256": hashlib.sha256((out / "classifier.pt").read_bytes()).hexdigest()}))
    with pytest.raises(UserError, match="classifier.pt holds more than tensors"):
        fc.load_classifier(str(out))
    assert not marker.exists(), "--classify ran code from classifier.pt"


def test_classify_with_an_empty_message_is_an_error_not_a_training_run(tmp_path):
    with pytest.raises(UserError, match="--classify is empty"):
        fc.main(["--classify", "", "--out_dir", str(tmp_path), "--init_from", str(tmp_path / "no-base")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag, value, message", [
    ("lora_alpha", float("nan"), "--lora_alpha nan: must be a finite number"),
    ("weight_decay", float("inf"), "--weight_decay inf: must be a finite number"),
    ("loraplus_ratio", float("nan"), "--loraplus_ratio nan: must be a finite number"),
    ("learning_rate", -1.0, "--learning_rate -1.0: use a number >= 0"),
    ("lora_targets", "all-linear,zz", "unknown LoRA target 'zz'"),
])
def test_bad_settings_are_refused_before_anything_runs(tiny_base, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fc.train_classifier(config(tiny_base, tmp_path, **{flag: value}))


def test_a_diverging_run_stops_before_saving_nan(tiny_base, tmp_path):
    with pytest.raises(UserError, match=r"^step \d+: the (training|validation) loss .* training diverged"):
        fc.train_classifier(config(tiny_base, tmp_path, mode="head", learning_rate=1e12, grad_clip=0.0, data_path=two_class_file(tmp_path)))
    if (tmp_path / "classifier.json").exists():  # an epoch ended well before: what it saved is finite and loads
        model, tokenizer, info = fc.load_classifier(str(tmp_path))
        assert math.isfinite(classifier.classify(model, tokenizer, "WIN cash now", info["max_length"])[1])
    assert not (tmp_path / "summary.json").exists()


def test_unreadable_or_mixed_classifier_files_are_named(tiny_base, tmp_path):
    fc.train_classifier(config(tiny_base, tmp_path, mode="head", data_path=two_class_file(tmp_path)))
    info_path = tmp_path / "classifier.json"
    info = info_path.read_text()
    for text, problem in [("", "is not valid JSON"), (info[:30], "is not valid JSON"), ('{"mode": "head"}', "lacks 'init_from'")]:
        info_path.write_text(text)
        with pytest.raises(UserError, match=f"classifier.json {problem}"):
            fc.load_classifier(str(tmp_path))
    info_path.write_text(info)
    fc.load_classifier(str(tmp_path))
    trained = torch.load(tmp_path / "classifier.pt", weights_only=True)
    torch.save({k: v + 1 for k, v in trained.items()}, tmp_path / "classifier.pt")  # e.g. another run's weights
    with pytest.raises(UserError, match="classifier.pt is not the file .*classifier.json was saved with"):
        fc.load_classifier(str(tmp_path))


def test_a_new_run_replaces_the_earlier_runs_files_and_one_run_owns_the_folder(tiny_base, tmp_path):
    data = two_class_file(tmp_path)
    fc.train_classifier(config(tiny_base, tmp_path / "out", mode="lora", lora_rank=2, data_path=data))
    fc.train_classifier(config(tiny_base, tmp_path / "out", mode="head", data_path=data))
    assert not (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()  # the LoRA run's weights are gone
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter", "classifier.json", "classifier.pt", "curves.png", "log.csv", "summary.json"]
    (tmp_path / "out" / "run.lock").write_text(f"{os.getppid()}\n")  # a live process holds the folder
    with pytest.raises(UserError, match="is in use by another run"):
        fc.train_classifier(config(tiny_base, tmp_path / "out", mode="head", data_path=data))
