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
                    batch_size=8, max_iters=30, eval_interval=10, eval_batches=4, learning_rate=3e-3, progress=False, device="cpu")
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


# ------------------------------------------------------------------------------------- instruction fine-tuning


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A small byte-level base, pretrained for a few steps, with room for Alpaca prompts (384 bytes)."""
    out = tmp_path_factory.mktemp("base")
    train.train(tiny_pretrain_config(out, n_embd=48, block_size=384, max_iters=25, eval_interval=25))
    return str(out)


def finetune_config(base, out_dir, **overrides):
    settings = dict(init_from=base, dataset="embedded", out_dir=str(out_dir), lora_rank=4, lora_alpha=8, batch_size=8, max_iters=15,
                    eval_interval=15, eval_batches=3, learning_rate=3e-3, num_samples=2, max_new_tokens=24, answer_limit=24,
                    progress=False, device="cpu")
    settings.update(overrides)
    return resolve_defaults(TrainConfig(**settings))


def test_lora_finetuning_lowers_loss_saves_only_the_adapter_and_reloads(small_base, tmp_path, capsys):
    summary = train.train(finetune_config(small_base, tmp_path))
    assert summary["finetune"] == "lora" and summary["val_loss_after"] < summary["val_loss_before"]
    for key in ("init_from", "lora_rank", "lora_alpha", "lora_targets", "trainable_params", "total_params", "train_examples",
                "val_loss_before", "val_loss_after", "seconds", "peak_memory_bytes"):
        assert summary[key] is not None, key
    # rank 4 on q and v of 2 layers, 48 wide: 2 layers x 2 targets x (4x48 + 48x4)
    assert summary["trainable_params"] == 2 * 2 * (4 * 48 + 48 * 4)
    import torch

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert "model" not in ckpt and all("lora_" in k for k in ckpt["trainable"])
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 20_000

    assert reloaded_val_loss(tmp_path, finetune_config(small_base, tmp_path)) == pytest.approx(summary["val_loss_after"], abs=1e-6)
    samples = json.load(open(tmp_path / "samples.json"))
    capsys.readouterr()
    train.answer_prompt(TrainConfig(adapter=str(tmp_path), prompt=samples[0]["instruction"], max_new_tokens=24, device="cpu"))
    assert capsys.readouterr().out.strip() == samples[0]["after"]


def test_answers_are_scored_before_and_after_and_a_file_is_answered_the_same_way(small_base, tmp_path, capsys):
    from instructions import contains_answer

    run = tmp_path / "run"
    summary = train.train(finetune_config(small_base, run, max_iters=4, eval_interval=4))
    assert summary["prompt_template"] == "compact"  # the byte-level base gets the short template
    for key in ("test_accuracy_before", "test_accuracy_after", "test_exact_match_before", "test_exact_match_after", "test_f1_after"):
        assert 0.0 <= summary[key] <= 1.0, key
    records = json.load(open(run / "samples.json"))
    assert len(records) == 24 and sum(r["correct_after"] for r in records) / 24 == summary["test_accuracy_after"]
    assert all(r["correct_after"] == contains_answer(r["after"], r["answer"]) for r in records)
    kinds = {row["kind"]: row for row in summary["test_by_kind"]}
    assert sum(row["examples"] for row in kinds.values()) == 24 and (run / "answers.csv").exists()

    # --answer_file: the same 24 test examples in a file of our own, plus an extra key and one without an output
    questions = [{k: r[k] for k in ("instruction", "input", "output", "answer", "kind")} | {"note": i} for i, r in enumerate(records)]
    questions.append({"instruction": "Name a colour."})
    (tmp_path / "in.json").write_text(json.dumps(questions))
    capsys.readouterr()
    train.answer_file(TrainConfig(adapter=str(run), answer_file=str(tmp_path / "in.json"), answers_out=str(tmp_path / "out.json"),
                                  max_new_tokens=24, device="cpu"))
    answered = json.load(open(tmp_path / "out.json"))
    assert [{k: v for k, v in a.items() if k != "response"} for a in answered] == questions  # every other key kept
    assert [a["response"] for a in answered[:24]] == [r["after"] for r in records]  # the run's own greedy answers
    assert f"accuracy {summary['test_accuracy_after']:.2f}" in capsys.readouterr().out


def test_batched_answers_equal_one_at_a_time(small_base):
    from instructions import format_prompt, load_examples
    from tokenizer import get_tokenizer

    model, tokenizer_name = train.load_checkpoint_model(small_base)
    tokenizer, examples = get_tokenizer(tokenizer_name), load_examples("embedded")[:40]
    lengths = [len(tokenizer.encode(format_prompt(ex, "compact"))) for ex in examples]
    assert len(set(lengths)) < len(lengths) - 5  # several prompts share a length, so some batches hold several rows
    batched = train.answer_examples(model, tokenizer, examples, "cpu", max_new_tokens=16, template="compact")
    alone = [train.answer(model, tokenizer, ex["instruction"], "cpu", 16, ex["input"], template="compact") for ex in examples]
    assert batched == alone


def reloaded_val_loss(adapter_dir, cfg):
    """Validation loss of base + the saved adapter, loaded afresh, on the batches training evaluated on."""
    from tokenizer import get_tokenizer

    model, tokenizer_name = train.load_finetuned(str(adapter_dir), "tiny", "cpu")
    template = train.resolve_template(cfg.prompt_template, tokenizer_name)
    data = train.InstructionData(cfg.dataset, get_tokenizer(tokenizer_name), model.config.block_size, cfg.seed, cfg.mask_prompt, template)
    return train.evaluate(model, data.val_batches(cfg.batch_size)[: cfg.eval_batches], "cpu")


def test_answer_is_greedy_in_eval_mode_whatever_mode_the_model_is_in():
    import torch

    from lora import apply_lora
    from model import GPT, GPTConfig
    from tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    apply_lora(model, rank=4, alpha=8, targets=("q", "v"), dropout=0.5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=5.0)  # large: with B = 0 (or small) dropout on the adapter could not change a greedy answer
    tokenizer = ByteTokenizer()
    in_train_mode = train.answer(model.train(), tokenizer, "Name a colour.", "cpu", max_new_tokens=16)
    assert model.training  # the caller's mode is restored
    in_eval_mode = train.answer(model.eval(), tokenizer, "Name a colour.", "cpu", max_new_tokens=16)
    assert in_train_mode == in_eval_mode and in_eval_mode != ""


def test_qlora_trains_only_adapters(small_base, tmp_path):
    import torch

    from quantize import Linear4bit

    cfg = finetune_config(small_base, tmp_path, quantize="nf4", max_iters=6, eval_interval=6)
    model, _, mode = train.prepare_model(cfg, "cpu")
    assert mode == "qlora" and any(isinstance(m, Linear4bit) for m in model.modules())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    summary = train.train(cfg)
    assert summary["finetune"] == "qlora" and summary["trainable_params"] == 2 * 2 * (4 * 48 + 48 * 4)
    assert summary["val_loss_after"] < summary["val_loss_before"]
    # reloading re-quantizes the base; the adapter must meet the same 4-bit weights it was trained on
    assert reloaded_val_loss(tmp_path, cfg) == pytest.approx(summary["val_loss_after"], abs=1e-6)


def test_full_finetuning_trains_everything(small_base, tmp_path):
    summary = train.train(finetune_config(small_base, tmp_path, finetune="full", max_iters=4, eval_interval=4, learning_rate=3e-4))
    assert summary["finetune"] == "full" and summary["trainable_params"] == summary["total_params"]


def test_lora_resume_continues_the_identical_trajectory(small_base, tmp_path, monkeypatch):
    import csv

    common = dict(max_iters=8, eval_interval=4, lora_dropout=0.1)
    train.train(finetune_config(small_base, tmp_path / "straight", **common))
    real_save = train.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(finetune_config(small_base, tmp_path / "resumed", **common))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.train(finetune_config(small_base, tmp_path / "resumed", resume=True, **common))
    losses = lambda d: [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / d / "log.csv"))]
    assert len(losses("resumed")) == 8 and losses("resumed") == losses("straight")
