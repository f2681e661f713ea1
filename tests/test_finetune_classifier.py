"""finetune_classifier.py: the head reads the last real token, each mode trains exactly what it claims, the cached trunk
computes what the whole model does; a trained classifier is saved, reloaded and used from the command line; bad
settings and files are refused. (The data: test_sms_data.py.)"""

import csv
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import WritesMarker

import finetune_classifier as fc
from model import GPT, GPTConfig, count_parameters
from quantize import Linear4bit
from support import checkpoints, sms_data
from support.files import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0, block_size=128, smear_keys=False):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=32, smear_keys=smear_keys))
    if smear_keys:  # away from sigmoid(0) = 1/2, different per head: smearing that a copy of attention could miss
        gpt.transformer.h[-1].attn.key_smear.data = torch.tensor([2.0, -1.5])
    return gpt


def save_base(gpt, path):
    """A GPT saved in train.py's checkpoint format: loads like any --init_from path."""
    torch.save(
        {
            "model_config": vars(gpt.config).copy(),
            "tokenizer": "bytes",
            "model": {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"},
        },
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random 2-layer byte-level GPT."""
    return save_base(tiny_gpt(), tmp_path_factory.mktemp("base") / "ckpt.pt")


@pytest.fixture(scope="module")
def smeared_base(tmp_path_factory):
    """The same with smeared keys, as the tiny base that train.py pretrains has."""
    return save_base(tiny_gpt(smear_keys=True), tmp_path_factory.mktemp("smeared") / "ckpt.pt")


def write(tmp_path, text, name="sms.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def config(tiny_base, out_dir, **overrides):
    settings = dict(init_from=tiny_base, out_dir=str(out_dir), epochs=1, progress=False, device="cpu")
    settings.update(overrides)
    return fc.ClassifierConfig(**settings)


# ---------------------------------------------------------------------------------------------- training and use


@pytest.mark.parametrize("mode", ["last_block", "head"])
def test_cached_and_uncached_training_runs_agree_on_a_smeared_base(smeared_base, tmp_path, mode):
    """End to end, on a base with smeared keys (the default tiny base has them): --cache_trunk (the default) and
    --no-cache_trunk train the same classifier, epoch by epoch."""
    data = write(
        tmp_path,
        "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)),
    )
    runs = [
        fc.train_classifier(
            config(
                smeared_base, tmp_path / str(cache), mode=mode, dataset=data, batch_size=4, epochs=3, cache_trunk=cache
            )
        )
        for cache in (True, False)
    ]
    assert (runs[0]["cached_blocks"], runs[1]["cached_blocks"]) == ({"last_block": 1, "head": 2}[mode], 0)
    logs = [list(csv.DictReader(open(tmp_path / str(cache) / "log.csv"))) for cache in (True, False)]
    assert len(logs[0]) == len(logs[1]) == 4  # before training, and 3 epochs
    for cached, uncached in zip(*logs):  # every epoch's losses
        for key in ("train_loss", "val_loss"):
            assert float(cached[key]) == pytest.approx(float(uncached[key]), abs=1e-4), (cached["epoch"], key)
    for key in ("train_loss", "val_loss", "test_loss"):
        assert runs[0][key] == pytest.approx(runs[1][key], abs=1e-5), key
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert runs[0][key] == runs[1][key], key


def test_lora_training_learns_the_sample_and_the_saved_classifier_reloads(tiny_base, tmp_path):
    summary = fc.train_classifier(config(tiny_base, tmp_path, epochs=2))
    for name in ("summary.json", "log.csv", "curves.png", "classifier.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "mode",
        "init_from",
        "lora_rank",
        "trainable_params",
        "total_params",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "seconds",
    ):
        assert key in saved, key
    assert saved["mode"] == "lora" and saved["lora_rank"] == 16 and saved["trainable_params"] < saved["total_params"]
    assert (
        summary["test_accuracy_before"] < 0.7 and summary["test_accuracy"] > 0.85
    )  # a random base, but the sample is easy
    assert sum(map(sum, summary["confusion_matrix"]["test"])) == summary["test_examples"] == 120
    assert summary["truncated_examples"] == 2  # two sample messages are longer than the 128-byte block
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 3  # header, before, 2 epochs

    model, tokenizer, info = fc.load_classifier(str(tmp_path))
    test = sms_data.split_messages(sms_data.balance_classes(sms_data.load_messages()))[2]
    predictions = [fc.classify(model, tokenizer, m.text, info["max_length"])[0] for m in test]
    accuracy = sum(p == sms_data.LABELS[m.label] for p, m in zip(predictions, test)) / len(test)
    assert accuracy == pytest.approx(summary["test_accuracy"])  # the reloaded model is the trained one


def test_split_metrics(model, tokenizer, data_path, max_length):
    """Loss and accuracy of `model` on the test split train_classifier made of data_path (the default split seed)."""
    test = sms_data.split_messages(sms_data.balance_classes(sms_data.load_messages(data_path)))[2]
    rows, _ = sms_data.encode_messages(test, tokenizer, max_length)
    return sms_data.evaluate_classifier(model, sms_data.make_batches(rows, 8, tokenizer.eot_token), "cpu")


test_split_metrics.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("mode", ["qlora", "last_block", "full"])
def test_other_modes_save_and_reload_what_they_trained(tiny_base, tmp_path, mode, monkeypatch):
    """Each mode's saved classifier, loaded afresh, is the trained model: the same test loss as the run reported, and
    the same probabilities as the model that finished training (held on to as it was saved)."""
    data = write(
        tmp_path,
        "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)),
    )
    saved = []
    real_save = fc.save_trained
    monkeypatch.setattr(fc, "save_trained", lambda model, *args: saved.append(model) or real_save(model, *args))
    summary = fc.train_classifier(config(tiny_base, tmp_path / "out", mode=mode, dataset=data, batch_size=4, epochs=2))
    assert summary["mode"] == mode and (summary["lora_rank"] is None) == (mode != "qlora")
    trained = saved[-1].eval()
    model, tokenizer, info = fc.load_classifier(str(tmp_path / "out"))
    assert any(isinstance(m, Linear4bit) for m in model.modules()) == (mode == "qlora")
    reloaded = test_split_metrics(model, tokenizer, data, info["max_length"])
    assert (
        reloaded["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
        and reloaded["accuracy"] == summary["test_accuracy"]
    )
    untrained = fc.build_classifier(checkpoints.load_checkpoint_model(tiny_base)[0], mode, lora_targets=("all-linear",))
    assert abs(test_split_metrics(untrained, tokenizer, data, info["max_length"])["loss"] - summary["test_loss"]) > 1e-3
    for message in ("WIN cash now 99", "home soon 12", "hello"):
        label, probability = fc.classify(model, tokenizer, message, info["max_length"])
        assert (label, probability) == pytest.approx(
            fc.classify(trained, tokenizer, message, info["max_length"]), abs=1e-6
        )
    if mode == "full":  # every weight trained, the tied embedding included, and every one is in the saved file
        base = checkpoints.load_checkpoint_model(tiny_base)[0]
        assert (model.gpt.transformer.wte.weight - base.transformer.wte.weight).abs().max() > 0
        assert all(
            not torch.equal(p, base.state_dict()[n]) for n, p in model.gpt.state_dict().items() if n.endswith("weight")
        )


def test_qlora_trains_the_same_classifier_on_every_dequantize_path(tiny_base, tmp_path, monkeypatch):
    """--dequantize table or kernel is an opt-in that computes the definition's values: the same losses, bit for bit,
    and the chosen path is the one that ran."""
    from support import fast_dequantize

    data = two_class_file(tmp_path)
    calls = []
    table = fast_dequantize.dequantize_4bit_table
    monkeypatch.setattr(fast_dequantize, "dequantize_4bit_table", lambda q: calls.append(1) or table(q))
    runs = {
        path: fc.train_classifier(
            config(tiny_base, tmp_path / path, mode="qlora", lora_rank=2, dataset=data, batch_size=4, dequantize=path)
        )
        for path in ("reference", "table")
    }
    assert calls, "--dequantize table did not take the table path"
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy"):
        assert runs["table"][key] == runs["reference"][key], key


def test_a_classifier_refuses_a_base_that_changed_since_training(tmp_path):
    base = tmp_path / "base.pt"
    save = lambda seed: torch.save(
        {
            "model_config": vars(tiny_gpt(seed).config).copy(),
            "tokenizer": "bytes",
            "model": {k: v for k, v in tiny_gpt(seed).state_dict().items() if k != "lm_head.weight"},
        },
        base,
    )
    save(seed=0)
    data = write(tmp_path, "".join(f"{'spam' if i % 2 else 'ham'}\tmessage {i}\n" for i in range(40)))
    fc.train_classifier(config(str(base), tmp_path / "out", mode="head", dataset=data))
    fc.load_classifier(str(tmp_path / "out"))  # the same base: fine
    save(seed=1)  # e.g. the tiny base pretrained again
    with pytest.raises(ValueError, match="not the one .* was trained on"):
        fc.load_classifier(str(tmp_path / "out"))


def test_bad_settings_are_clear_errors(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="--mode 'adapter'"):
        fc.train_classifier(config(tiny_base, tmp_path, mode="adapter"))
    with pytest.raises(ValueError, match="--dequantize kernel: only --mode qlora has a 4-bit base"):
        fc.train_classifier(config(tiny_base, tmp_path, mode="lora", dequantize="kernel"))
    with pytest.raises(ValueError, match="--dataset 'imdb'"):
        fc.train_classifier(config(tiny_base, tmp_path, dataset="imdb"))
    with pytest.raises(ValueError, match="block_size 128"):
        fc.train_classifier(config(tiny_base, tmp_path, max_length=1000))
    with pytest.raises(FileNotFoundError, match="no classifier"):
        fc.load_classifier(str(tmp_path / "empty"))


def test_command_line_trains_and_classifies(tiny_base, tmp_path):
    out = str(tmp_path / "out")
    data = write(
        tmp_path,
        "".join(
            f"{'spam' if i % 2 else 'ham'}\t{'Claim your prize' if i % 2 else 'See you later'} {i}\n" for i in range(40)
        ),
    )
    run = lambda *args: subprocess.run(
        [sys.executable, "finetune_classifier.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    trained = run(
        "--init_from",
        tiny_base,
        "--data_path",
        data,
        "--out_dir",
        out,
        "--mode",
        "head",
        "--epochs",
        "1",
        "--no-progress",
    )
    assert trained.returncode == 0, trained.stderr
    assert "head: 66 trainable" in trained.stdout and "confusion matrix" in trained.stdout  # 2 x 32 weights + 2 biases
    answer = run("--classify", "Claim your prize 7", "--out_dir", out)
    assert answer.returncode == 0, answer.stderr
    label, probability = answer.stdout.split()[0], float(answer.stdout.split("probability ")[1].rstrip(")\n"))
    model, tokenizer, info = fc.load_classifier(out)  # what the saved classifier says, computed here
    expected_label, expected_probability = fc.classify(model, tokenizer, "Claim your prize 7", info["max_length"])
    assert label == expected_label and probability == pytest.approx(
        expected_probability, abs=5e-4
    )  # printed to 3 places
    with pytest.raises(FileNotFoundError, match="no classifier"):  # the script prints it as "error: ..." and exits 1
        fc.main(["--classify", "hello", "--out_dir", str(tmp_path / "nothing")])


def test_flags_mirror_the_config_and_unknown_flags_fail(capsys):
    with pytest.raises(SystemExit):
        fc.parse_args(["--help"])
    helped = capsys.readouterr().out
    for flag in ("--mode", "--init_from", "--dataset", "--lora_rank", "--lora_targets", "--epochs", "--classify"):
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
    return write(
        tmp_path,
        "".join(f"{'spam' if i % 2 else 'ham'}\t{'WIN cash now' if i % 2 else 'home soon'} {i}\n" for i in range(40)),
    )


def test_no_loading_path_unpickles_objects_from_a_checkpoint(tiny_base, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    trap = {"iter": 1, "train_config": {"max_iters": 5}, "model": {}, "trap": WritesMarker(marker)}
    tiny_dir = tmp_path / "tiny-base"
    tiny_dir.mkdir()
    torch.save(trap, tiny_dir / "ckpt.pt")
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(tiny_dir))
    out = tmp_path / "out"
    fc.train_classifier(config(tiny_base, out, mode="head", dataset=two_class_file(tmp_path)))
    info = json.loads((out / "classifier.json").read_text())
    (out / "classifier.json").write_text(
        json.dumps({**info, "init_from": "tiny"})
    )  # trained on the (now booby-trapped) tiny base
    with pytest.raises(UserError, match="more than tensors and plain containers"):
        fc.train_classifier(config("tiny", tmp_path / "out2", mode="head", dataset=two_class_file(tmp_path)))
    assert not marker.exists(), "training from the tiny base ran code from its checkpoint"
    with pytest.raises(UserError, match="more than tensors and plain containers"):
        fc.main(["--classify", "hello", "--out_dir", str(out)])
    assert not marker.exists(), "--classify ran code from the tiny base's checkpoint"
    torch.save(trap, out / "classifier.pt")
    (out / "classifier.json").write_text(
        json.dumps({**info, "weights_sha256": hashlib.sha256((out / "classifier.pt").read_bytes()).hexdigest()})
    )
    with pytest.raises(UserError, match="classifier.pt holds more than tensors"):
        fc.load_classifier(str(out))
    assert not marker.exists(), "--classify ran code from classifier.pt"


def test_classify_with_an_empty_message_is_an_error_not_a_training_run(tmp_path):
    with pytest.raises(UserError, match="--classify is empty"):
        fc.main(["--classify", "", "--out_dir", str(tmp_path), "--init_from", str(tmp_path / "no-base")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("lora_alpha", float("nan"), "--lora_alpha nan: must be a finite number"),
        ("weight_decay", float("inf"), "--weight_decay inf: must be a finite number"),
        ("loraplus_ratio", float("nan"), "--loraplus_ratio nan: must be a finite number"),
        ("learning_rate", -1.0, "--learning_rate -1.0: use a number >= 0"),
        ("lora_targets", "all-linear,zz", "unknown LoRA target 'zz'"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(tiny_base, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fc.train_classifier(config(tiny_base, tmp_path, **{flag: value}))


def test_a_diverging_run_stops_before_saving_nan(tiny_base, tmp_path):
    with pytest.raises(UserError, match=r"^step \d+: the (training|validation) loss .* training diverged"):
        fc.train_classifier(
            config(
                tiny_base, tmp_path, mode="head", learning_rate=1e12, grad_clip=0.0, dataset=two_class_file(tmp_path)
            )
        )
    if (tmp_path / "classifier.json").exists():  # an epoch ended well before: what it saved is finite and loads
        model, tokenizer, info = fc.load_classifier(str(tmp_path))
        assert math.isfinite(fc.classify(model, tokenizer, "WIN cash now", info["max_length"])[1])
    assert not (tmp_path / "summary.json").exists()


def test_unreadable_or_mixed_classifier_files_are_named(tiny_base, tmp_path):
    fc.train_classifier(config(tiny_base, tmp_path, mode="head", dataset=two_class_file(tmp_path)))
    info_path = tmp_path / "classifier.json"
    info = info_path.read_text()
    for text, problem in [
        ("", "is not valid JSON"),
        (info[:30], "is not valid JSON"),
        ('{"mode": "head"}', "lacks 'init_from'"),
    ]:
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
    fc.train_classifier(config(tiny_base, tmp_path / "out", mode="lora", lora_rank=2, dataset=data))
    fc.train_classifier(config(tiny_base, tmp_path / "out", mode="head", dataset=data))
    assert not (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()  # the LoRA run's weights are gone
    assert sorted(os.listdir(tmp_path / "out")) == [
        "adapter",
        "classifier.json",
        "classifier.pt",
        "curves.png",
        "log.csv",
        "summary.json",
    ]
    from support.runs import lock_out_dir

    with lock_out_dir(str(tmp_path / "out")):  # another run holds the folder (its flock)
        with pytest.raises(UserError, match="is in use by another run"):
            fc.train_classifier(config(tiny_base, tmp_path / "out", mode="head", dataset=data))


# ---------------------------------------------------------------------------------------------- the model


def test_head_reads_the_last_real_token_whatever_the_padding():
    model = fc.GPTClassifier(tiny_gpt()).eval()
    messages = [list(b"see u at 6"), list(b"WIN a \xc2\xa31000 prize, call now!"), list(b"ok")]
    alone = torch.cat([model(torch.tensor([ids])) for ids in messages])  # no padding at all
    rows = [(ids, 0) for ids in messages]
    x, lengths, _ = sms_data.collate_messages(rows, pad_id=256)
    with torch.no_grad():
        batched = model(x, lengths)
        extra = torch.cat([x, torch.randint(0, 257, (x.size(0), 17))], dim=1)  # more padding, and not even pad ids
        padded_more = model(extra, lengths)
        naive = model(extra)  # reading the final position instead: what padding would break
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded_more.argmax(-1), alone.argmax(-1))
    assert not torch.allclose(naive, alone, atol=1e-3)
    with pytest.raises(ValueError, match="lengths"):
        model(x, torch.tensor([0, 1, 2]))


def expected_trainable(name, mode, n_layer):
    if mode == "full" or name.startswith("head."):
        return True
    if mode == "head":
        return False
    if mode == "last_block":
        return name.startswith(f"gpt.transformer.h.{n_layer - 1}.") or name.startswith("gpt.transformer.ln_f.")
    return ".lora_A." in name or ".lora_B." in name  # lora and qlora


@pytest.mark.parametrize("mode", fc.MODES)
def test_each_mode_trains_exactly_what_it_claims(mode):
    model = fc.build_classifier(tiny_gpt(), mode, lora_rank=4, lora_alpha=8, lora_targets=("q", "v", "mlp_in"))
    n_layer = model.gpt.config.n_layer
    claimed = {n for n, p in model.named_parameters() if expected_trainable(n, mode, n_layer)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == claimed
    if mode == "qlora":
        assert isinstance(model.gpt.transformer.h[0].attn.q_proj.base, Linear4bit)  # the base is 4-bit
        assert isinstance(model.gpt.transformer.h[0].attn.k_proj, Linear4bit)  # not a target: 4-bit, no LoRA
        assert isinstance(model.head, torch.nn.Linear)  # the head is not quantized
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, lengths, y = sms_data.collate_messages([(list(b"free prize now"), 1), (list(b"home by 6"), 0)], pad_id=256)
    model.train()
    for _ in range(2):  # two steps: LoRA's A gets no gradient until B has moved away from 0
        torch.nn.functional.cross_entropy(model(x, lengths), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not torch.equal(t, before[n])}
    assert changed == claimed


def test_parameter_counts_on_the_tiny_base_config():
    """The numbers quoted in the notebook: 4 layers, 256 wide, 4 heads, block 512, byte vocabulary."""
    config = GPTConfig(block_size=512, vocab_size=257, n_layer=4, n_head=4, n_embd=256)
    block = 2 * 512 + 4 * (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
    total = 257 * 256 + 512 * 256 + 4 * block + 512 + (256 * 2 + 2)
    expected = {
        "head": 514,
        "last_block": block + 512 + 514,
        "lora": 4 * 16 * (6 * 256 + 4 * 256 + 2 * 1024) + 514,
        "full": total,
    }
    for mode, trainable in expected.items():
        torch.manual_seed(0)
        counts = count_parameters(fc.build_classifier(GPT(config), mode, lora_rank=16, lora_targets=("all-linear",)))
        assert counts == (trainable, total + (trainable - 514 if mode == "lora" else 0)), mode
    assert (expected["last_block"], expected["lora"], total) == (790_786, 295_426, 3_356_930)


@pytest.mark.parametrize("mode", fc.MODES)
def test_frozen_blocks_are_the_ones_below_everything_that_trains(mode):
    model = fc.build_classifier(tiny_gpt(), mode, lora_rank=4, lora_alpha=8)
    assert model.frozen_blocks() == {"head": 2, "last_block": 1}.get(mode, 0)
    dropout = fc.build_classifier(
        GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32, dropout=0.1)), mode
    )
    assert dropout.frozen_blocks() == 0  # random outputs cannot be computed once


@pytest.mark.parametrize("smear_keys", [False, True])
@pytest.mark.parametrize("mode", ["head", "last_block"])
def test_cached_trunk_gives_the_same_logits_and_gradients(mode, smear_keys):
    """Training on cache_trunk's activations computes what the whole model computes on the token ids: the same logits,
    loss and gradients, whatever the padding, with and without smeared keys (a copy of attention once missed them)."""
    model = fc.build_classifier(tiny_gpt(smear_keys=smear_keys), mode)
    model.gpt.transformer.h[-1].mlp.fc_out.weight.data.normal_(std=0.1)  # make the last block matter
    messages = [
        list(b"see u at 6"),
        list(b"WIN a \xc2\xa31000 prize, call now!"),
        list(b"ok"),
        list(b"free entry in 2 a wkly comp"),
    ]
    rows = [(ids, i % 2) for i, ids in enumerate(messages)]
    n = model.frozen_blocks()
    cached = fc.cache_trunk(model, rows, n, batch_size=3, pad_id=256, device="cpu")
    assert [tuple(a.shape) for a, _ in cached] == [(len(ids), 32) for ids in messages] and [y for _, y in cached] == [
        0,
        1,
        0,
        1,
    ]
    results = []
    model.train()
    from_ids = lambda x, lengths: model(x, lengths)
    from_cache = lambda x, lengths: model.forward_from_block(x, lengths, n)
    for (x, lengths, y), logits_of in (
        (sms_data.collate_messages(rows, 256), from_ids),
        (sms_data.collate_activations(cached), from_cache),
    ):
        model.zero_grad(set_to_none=True)
        logits = logits_of(x, lengths)
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append(
            (logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        )
    (plain, plain_grads), (fast, fast_grads) = results
    assert (plain - fast).abs().max().item() <= 1e-6
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 1
    for name in plain_grads:
        assert (plain_grads[name] - fast_grads[name]).abs().max().item() <= 1e-6, name
