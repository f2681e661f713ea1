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
                    eval_interval=15, eval_batches=3, learning_rate=3e-3, num_samples=2, max_new_tokens=24, progress=False, device="cpu")
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


def reloaded_val_loss(adapter_dir, cfg):
    """Validation loss of base + the saved adapter, loaded afresh, on the batches training evaluated on."""
    from tokenizer import get_tokenizer

    model, tokenizer_name = train.load_finetuned(str(adapter_dir), "tiny", "cpu")
    data = train.InstructionData(cfg.dataset, get_tokenizer(tokenizer_name), model.config.block_size, cfg.seed, cfg.mask_prompt)
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


def test_packing_and_gradient_checkpointing_train(small_base, tmp_path, capsys):
    summary = train.train(finetune_config(small_base, tmp_path, pack=True, grad_checkpointing=True, mask_prompt=True, max_iters=6, eval_interval=6))
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert "packed into" in capsys.readouterr().out


def test_packed_rows_hold_every_training_example_once():
    from tokenizer import get_tokenizer

    data = train.InstructionData("embedded", get_tokenizer("bytes"), 512, 1337, mask_prompt=False, pack=True)
    data.grad_accum = 1
    assert sorted(ex[0] for row in data.packed for ex in row) == sorted(ex[0] for ex in data.train)
    assert all(sum(len(ids) - 1 for ids, _ in row) <= 512 for row in data.packed)
    assert len(data.packed) < 0.6 * len(data.train)  # ~220-byte examples: about two per 512-byte row
    x, y, segments = data.train_batch(0, 0, 8)
    assert x.shape == y.shape == segments.shape and x.shape[0] == 8 and x.shape[1] <= 512


def test_export_peft_and_hf_from_the_command_line(small_base, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel
    from peft import PeftModel

    run = tmp_path / "run"
    train.train(finetune_config(small_base, run, max_iters=3, eval_interval=3, lora_targets="q,k,o"))
    train.export_run(parse_args(["--adapter", str(run), "--export_peft", str(tmp_path / "peft"), "--export_hf", str(tmp_path / "hf")]))
    ours, _ = train.load_finetuned(str(run), "tiny", "cpu")
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)[0]
        base = GPT2LMHeadModel.from_pretrained(tmp_path / "peft" / "base")  # the tiny base is not an HF model: written beside the adapter
        base_logits = base.eval()(idx).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(idx).logits
        merged_logits = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(idx).logits
    assert (expected - base_logits).abs().max().item() > 1e-3  # the adapter matters, so the comparisons below do
    assert (expected - peft_logits).abs().max().item() <= 1e-4
    assert (expected - merged_logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="--export_peft needs --adapter"):
        train.export_run(parse_args(["--export_peft", str(tmp_path / "x")]))


def test_chat_dataset_trains_on_assistant_turns_and_answers(small_base, tmp_path):
    conversations = [{"messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": f"What is {i} plus {i}?"},
                                   {"role": "assistant", "content": str(2 * i)}, {"role": "user", "content": "And doubled?"},
                                   {"role": "assistant", "content": str(4 * i)}]} for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations))
    summary = train.train(finetune_config(small_base, tmp_path / "run", dataset=str(path), mask_prompt=True, pack=True, max_iters=4, eval_interval=4))
    assert summary["val_loss_after"] < summary["val_loss_before"] and summary["train_examples"] == 34
    samples = json.load(open(tmp_path / "run" / "samples.json"))
    assert samples[0]["messages"] == conversations[36]["messages"] and isinstance(samples[0]["after"], str)
