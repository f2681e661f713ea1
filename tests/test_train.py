"""train.py: pretraining lowers the loss, resuming continues the same trajectory, the CLI's contract, and every
hostile or careless input is refused with a clear one-line error (issue 17)."""

import csv
import errno
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import WritesMarker

import chat
import train
from chat import ChatConfig
from lora import DoRALinear
from support import answers, checkpoints, cli, export, instruction_files, instructions, reports, resume
from support.files import UserError, write_json_atomic
from support.runs import lock_out_dir
from train import TrainConfig, mean_token_loss, parse_args, resolve_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_pretrain_config(out_dir, **overrides):
    settings = dict(
        init_from="scratch",
        dataset="stdlib",
        out_dir=str(out_dir),
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        batch_size=8,
        max_iters=30,
        eval_interval=10,
        eval_batches=4,
        learning_rate=3e-3,
        progress=False,
        device="cpu",
    )
    settings.update(overrides)
    return resolve_defaults(TrainConfig(**settings))


def test_pretraining_lowers_validation_loss(tmp_path):
    summary = train.train(tiny_pretrain_config(tmp_path))
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0  # from ~5.5 (uniform over 257) downwards
    for name in ("ckpt.pt", "log.csv", "loss.png", "summary.json"):
        assert (tmp_path / name).exists()
    model, tokenizer_name = checkpoints.load_checkpoint_model(str(tmp_path))
    assert tokenizer_name == "bytes" and model.config.n_embd == 32


def test_resume_continues_the_identical_trajectory(tmp_path, crash_after_checkpoint):
    straight = train.train(tiny_pretrain_config(tmp_path / "straight", max_iters=20, dropout=0.1))
    straight_log = json.load(open(tmp_path / "straight" / "summary.json"))
    assert straight_log["steps"] == 20

    restore_save = crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_pretrain_config(tmp_path / "resumed", max_iters=20, dropout=0.1))
    restore_save()
    resumed = train.train(tiny_pretrain_config(tmp_path / "resumed", max_iters=20, dropout=0.1, resume=True))

    import csv

    losses = lambda d: [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / d / "log.csv"))]
    assert len(losses("resumed")) == 20
    assert losses("resumed") == losses("straight")  # bit for bit, dropout included
    assert resumed["val_loss_after"] == straight["val_loss_after"]


def test_help_lists_every_flag_with_its_default_and_unknown_flags_fail():
    out = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "120"},
    ).stdout
    for flag in (
        "--lora_rank",
        "--lora_alpha",
        "--lora_targets",
        "--quantize",
        "--init_from",
        "--[no-]resume",
        "--device",
        "--[no-]mask_prompt",
    ):
        assert flag in out
    words = " ".join(out.split())  # help texts wrap
    assert "(default: 32)" in words and "(default: all-linear)" in words
    bad = subprocess.run([sys.executable, "train.py", "--lora_rnak", "4"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unrecognized arguments: --lora_rnak" in bad.stderr


def test_parse_args_types():
    cfg = parse_args(["--lora_rank", "4", "--lora_alpha", "8", "--mask_prompt", "--no-progress"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.mask_prompt, cfg.progress) == (4, 8.0, True, False)


def test_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="--finetune lora"):
        cli.check_train_config(TrainConfig(finetune="full", quantize="nf4"))
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        cli.check_train_config(TrainConfig(finetune="adapter"))
    with pytest.raises(ValueError, match="--init_from scratch --dataset stdlib"):
        cli.check_train_config(TrainConfig(init_from="scratch", dataset="embedded"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.load_checkpoint_model("/nonexistent/ckpt.pt")


# ------------------------------------------------------------------------------------- instruction fine-tuning


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A small byte-level base, pretrained for a few steps, with room for Alpaca prompts (384 bytes)."""
    out = tmp_path_factory.mktemp("base")
    train.train(tiny_pretrain_config(out, n_embd=48, block_size=384, max_iters=25, eval_interval=25))
    return str(out)


def finetune_config(base, out_dir, **overrides):
    settings = dict(
        init_from=base,
        dataset="embedded",
        out_dir=str(out_dir),
        lora_rank=4,
        lora_alpha=8,
        lora_targets="q,v",
        batch_size=8,
        max_iters=15,
        eval_interval=15,
        eval_batches=3,
        learning_rate=3e-3,
        num_samples=2,
        max_new_tokens=24,
        answer_limit=24,
        progress=False,
        device="cpu",
    )
    settings.update(overrides)
    return resolve_defaults(TrainConfig(**settings))


def test_lora_finetuning_lowers_loss_saves_only_the_adapter_and_reloads(small_base, tmp_path, capsys):
    summary = train.train(finetune_config(small_base, tmp_path))
    assert summary["finetune"] == "lora" and summary["val_loss_after"] < summary["val_loss_before"]
    for key in (
        "init_from",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "trainable_params",
        "total_params",
        "train_examples",
        "val_loss_before",
        "val_loss_after",
        "seconds",
        "peak_memory_bytes",
    ):
        assert summary[key] is not None, key
    # rank 4 on q and v of 2 layers, 48 wide: 2 layers x 2 targets x (4x48 + 48x4)
    assert summary["trainable_params"] == 2 * 2 * (4 * 48 + 48 * 4)
    import torch

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "model" not in ckpt and all("lora_" in k for k in ckpt["trainable"])
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 20_000

    assert reloaded_val_loss(tmp_path, finetune_config(small_base, tmp_path)) == pytest.approx(
        summary["val_loss_after"], abs=1e-6
    )
    samples = json.load(open(tmp_path / "samples.json"))
    capsys.readouterr()
    chat.answer_prompt(
        ChatConfig(adapter=str(tmp_path), prompt=samples[0]["instruction"], max_new_tokens=24, device="cpu")
    )
    assert capsys.readouterr().out.strip() == samples[0]["after"]


def test_answers_are_scored_before_and_after_and_a_file_is_answered_the_same_way(small_base, tmp_path, capsys):
    from support.answers import contains_answer

    run = tmp_path / "run"
    summary = train.train(finetune_config(small_base, run, max_iters=4, eval_interval=4))
    assert summary["prompt_template"] == "bare"  # the byte-level base gets the shortest template
    for key in (
        "test_accuracy_before",
        "test_accuracy_after",
        "test_exact_match_before",
        "test_exact_match_after",
        "test_f1_after",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    records = json.load(open(run / "samples.json"))
    assert all(r["correct_after"] == contains_answer(r["after"], r["answer"]) for r in records)
    # the test examples asked in held-out phrasings are scored apart: test_accuracy_new_phrasings
    for held_out, key in ((False, "test_accuracy_after"), (True, "test_accuracy_new_phrasings")):
        part = [r["correct_after"] for r in records if (r["phrasing"] == "held_out") == held_out]
        assert len(records) == 24 and 0 < len(part) < 24 and sum(part) / len(part) == summary[key], key
    kinds = {row["kind"]: row for row in summary["test_by_kind"]}
    assert (
        sum(row["examples"] or 0 for row in kinds.values())
        + sum(row["examples_new_phrasings"] or 0 for row in kinds.values())
        == 24
    )
    assert (run / "answers.csv").exists()

    # --answer_file: the same 24 test examples in a file of our own, plus an extra key and one without an output
    questions = [
        {k: r[k] for k in ("instruction", "input", "output", "answer", "kind")} | {"note": i}
        for i, r in enumerate(records)
    ]
    questions.append({"instruction": "Name a colour."})
    (tmp_path / "in.json").write_text(json.dumps(questions))
    capsys.readouterr()
    chat.answer_file(
        ChatConfig(
            adapter=str(run),
            answer_file=str(tmp_path / "in.json"),
            answers_out=str(tmp_path / "out.json"),
            max_new_tokens=24,
            device="cpu",
        )
    )
    answered = json.load(open(tmp_path / "out.json"))
    assert [{k: v for k, v in a.items() if k != "response"} for a in answered] == questions  # every other key kept
    assert [a["response"] for a in answered[:24]] == [r["after"] for r in records]  # the run's own greedy answers
    assert f"accuracy {sum(r['correct_after'] for r in records) / 24:.2f}" in capsys.readouterr().out  # both phrasings


def test_batched_answers_equal_one_at_a_time(small_base):
    from support.instruction_files import load_examples
    from support.instructions import format_prompt
    from support.tokenizer import get_tokenizer

    model, tokenizer_name = checkpoints.load_checkpoint_model(small_base)
    tokenizer, examples = get_tokenizer(tokenizer_name), load_examples("embedded")[:40]
    lengths = [len(tokenizer.encode(format_prompt(ex, "compact"))) for ex in examples]
    assert 5 < len(set(lengths)) < len(lengths) - 5  # shared lengths, and many: one batch, mostly left-padded rows
    batched = answers.answer_examples(model, tokenizer, examples, "cpu", max_new_tokens=16, template="compact")
    alone = [
        answers.answer(model, tokenizer, ex["instruction"], "cpu", 16, ex["input"], template="compact")
        for ex in examples
    ]
    assert batched == alone
    # the trained base answers alike with or without the filler in view; a random one (weights of std 0.2) does not
    import torch
    from conftest import randomize_weights

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = randomize_weights(
        GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval(), seed=3
    )
    batched = answers.answer_examples(model, tokenizer, examples, "cpu", max_new_tokens=8, template="compact")
    alone = [
        answers.answer(model, tokenizer, ex["instruction"], "cpu", 8, ex["input"], template="compact")
        for ex in examples
    ]
    assert batched == alone and len(set(alone)) > 20


def reloaded_val_loss(adapter_dir, cfg, model=None):
    """Validation loss of base + the saved adapter, loaded afresh (or of `model`), on the batches training evaluated on."""
    from support.tokenizer import get_tokenizer

    model, tokenizer_name = (
        (model, "bytes") if model is not None else checkpoints.load_finetuned(str(adapter_dir), "tiny", "cpu")
    )
    template = instructions.resolve_template(cfg.prompt_template, tokenizer_name)
    data = instructions.InstructionData(
        cfg.dataset, get_tokenizer(tokenizer_name), model.config.block_size, cfg.seed, cfg.mask_prompt, template
    )
    return mean_token_loss(model, data.val_batches(cfg.batch_size)[: cfg.eval_batches], "cpu")


def test_answer_is_greedy_in_eval_mode_whatever_mode_the_model_is_in():
    import torch

    from lora import apply_lora
    from model import GPT, GPTConfig
    from support.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    apply_lora(model, rank=4, alpha=8, targets=("q", "v"), dropout=0.5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(
                p, std=5.0
            )  # large: with B = 0 (or small) dropout on the adapter could not change a greedy answer
    tokenizer = ByteTokenizer()
    in_train_mode = answers.answer(model.train(), tokenizer, "Name a colour.", "cpu", max_new_tokens=16)
    assert model.training  # the caller's mode is restored
    in_eval_mode = answers.answer(model.eval(), tokenizer, "Name a colour.", "cpu", max_new_tokens=16)
    assert in_train_mode == in_eval_mode and in_eval_mode != ""


def test_qlora_trains_only_adapters(small_base, tmp_path):
    from quantize import Linear4bit

    cfg = finetune_config(small_base, tmp_path, quantize="nf4", max_iters=12, eval_interval=12, mask_prompt=True)
    model, _, mode, base_sha256 = train.prepare_model(cfg, "cpu")
    assert mode == "qlora" and any(isinstance(m, Linear4bit) for m in model.modules())
    assert base_sha256 == checkpoints.weights_sha256(
        checkpoints.load_base_model(small_base)[0]
    )  # the base before 4 bits
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    summary = train.train(cfg)
    assert (summary["finetune"], summary["quantize"]) == ("lora", "nf4") and summary["trainable_params"] == 2 * 2 * (
        4 * 48 + 48 * 4
    )
    assert summary["val_loss_after"] < summary["val_loss_before"]
    # reloading re-quantizes the base; the adapter must meet the same 4-bit weights it was trained on
    assert reloaded_val_loss(tmp_path, cfg) == pytest.approx(summary["val_loss_after"], abs=1e-6)


def test_full_finetuning_trains_every_weight_and_saves_them(small_base, tmp_path):
    summary = train.train(
        finetune_config(small_base, tmp_path, finetune="full", max_iters=4, eval_interval=4, learning_rate=3e-4)
    )
    assert summary["finetune"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert summary["val_loss_after"] < summary["val_loss_before"]
    base, tuned = checkpoints.load_checkpoint_model(small_base)[0], checkpoints.load_checkpoint_model(str(tmp_path))[0]
    before, after = base.state_dict(), tuned.state_dict()
    assert after.keys() == before.keys()
    unchanged = [name for name in after if torch.equal(after[name], before[name])]
    assert unchanged == [], (
        f"full fine-tuning left {unchanged} as they were"
    )  # embeddings, norms, biases: everything moved
    assert reloaded_val_loss(tmp_path, finetune_config(small_base, tmp_path), model=tuned) == pytest.approx(
        summary["val_loss_after"], abs=1e-6
    )


def test_dora_rslora_and_loraplus_from_the_command_line(small_base, tmp_path):
    """--use_dora, --use_rslora and --loraplus_ratio reach the model and the optimizer, and what a run saves reloads
    as the model it trained: DoRA's magnitudes in the adapter file, rsLoRA's alpha / sqrt(r) in its config, B's rate at
    16 x A's in the optimizer state."""
    cfg = finetune_config(
        small_base, tmp_path, use_dora=True, use_rslora=True, loraplus_ratio=16.0, max_iters=3, eval_interval=3
    )
    summary = train.train(cfg)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert (config["use_dora"], config["use_rslora"], config["rank"], config["alpha"]) == (True, True, 4, 8)
    from safetensors.torch import load_file

    magnitudes = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_magnitude" in k]
    assert len(magnitudes) == 2 * 2  # q and v of 2 blocks
    model, _ = checkpoints.load_finetuned(str(tmp_path), "tiny", "cpu")
    q = model.transformer.h[0].attn.q_proj
    assert q.scaling == pytest.approx(8 / 4**0.5) and isinstance(q, DoRALinear)
    assert reloaded_val_loss(tmp_path, cfg) == pytest.approx(summary["val_loss_after"], abs=1e-6)
    groups = {g["name"]: g for g in torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]}
    assert groups["lora_B"]["lr_scale"] == 16.0 and groups["lora_A"]["lr_scale"] == 1.0
    assert groups["lora_B"]["lr"] == pytest.approx(16 * groups["lora_A"]["lr"])


def test_packing_and_gradient_checkpointing_train(small_base, tmp_path, capsys):
    summary = train.train(
        finetune_config(
            small_base, tmp_path, pack=True, grad_checkpointing=True, mask_prompt=True, max_iters=6, eval_interval=6
        )
    )
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert "packed into" in capsys.readouterr().out


def test_packed_rows_hold_every_training_example_once():
    from support.tokenizer import get_tokenizer

    data = instructions.InstructionData("embedded", get_tokenizer("bytes"), 512, 1337, mask_prompt=False, pack=True)
    data.grad_accum = 1
    assert sorted(ex[0] for row in data.packed for ex in row) == sorted(ex[0] for ex in data.train)
    assert all(sum(len(ids) - 1 for ids, _ in row) <= 512 for row in data.packed)
    assert len(data.packed) < 0.6 * len(data.train)  # ~220-byte examples: about two per 512-byte row
    x, y, segments = data.train_batch(0, 0, 8)
    assert x.shape == y.shape == segments.shape and x.shape[0] == 8 and x.shape[1] <= 512


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A base pretrained without smeared keys (HF's GPT-2 has none: only such a base exports) and a LoRA run on it."""
    root = tmp_path_factory.mktemp("plain")
    train.train(
        tiny_pretrain_config(root / "base", n_embd=48, block_size=384, max_iters=3, eval_interval=3, smear_keys=False)
    )
    train.train(finetune_config(str(root / "base"), root / "run", max_iters=3, eval_interval=3, lora_targets="q,k,o"))
    return root / "base", root / "run"


def test_chat_dataset_trains_on_assistant_turns_and_answers(small_base, tmp_path):
    conversations = [
        {
            "messages": [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": str(4 * i)},
            ]
        }
        for i in range(40)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations))
    summary = train.train(
        finetune_config(
            small_base, tmp_path / "run", dataset=str(path), mask_prompt=True, pack=True, max_iters=4, eval_interval=4
        )
    )
    assert summary["val_loss_after"] < summary["val_loss_before"] and summary["train_examples"] == 34
    samples = json.load(open(tmp_path / "run" / "samples.json"))
    assert samples[0]["messages"] == conversations[36]["messages"] and isinstance(samples[0]["after"], str)
    # every test conversation is answered at its last assistant turn and scored against it (no key answers: no accuracy)
    assert [s["messages"] for s in samples] == [c["messages"] for c in conversations[36:]]
    assert summary["test_by_kind"] == [
        {
            "kind": "all",
            "examples": 4,
            "exact_match_before": summary["test_exact_match_before"],
            "exact_match_after": summary["test_exact_match_after"],
            "f1_before": summary["test_f1_before"],
            "f1_after": summary["test_f1_after"],
        }
    ]
    assert "test_accuracy_after" not in summary and (tmp_path / "run" / "answers.csv").exists()


# ------------------------------------------------------------------------------------- hostile and careless inputs
# Each test below failed before the checks it exercises existed (issue 17).


def run_main(script, *args, monkeypatch):
    """Run a script's __main__ in this process (no second torch import) -> what it exits with. A user error must end
    in sys.exit("error: ...") (status 1, one line, no traceback), never in an exception."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return exited.value.code


def booby_trapped_checkpoint(path, marker):
    torch.save(
        {
            "iter": 1,
            "train_config": {"max_iters": 5},
            "model_config": {},
            "tokenizer": "bytes",
            "model": {},
            "trainable": {},
            "optimizer": {},
            "rng": torch.get_rng_state(),
            "log": [],
            "before": {},
            "trap": WritesMarker(marker),
        },
        path,
    )


def test_no_loading_path_unpickles_objects_from_a_checkpoint(small_base, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    tiny_base = tmp_path / "tiny-base"
    tiny_base.mkdir()
    booby_trapped_checkpoint(tiny_base / "ckpt.pt", marker)
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(tiny_base))
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    booby_trapped_checkpoint(resume_dir / "ckpt.pt", marker)
    adapter_dir = tmp_path / "adapter"
    train.train(finetune_config(small_base, adapter_dir, max_iters=2, eval_interval=2, num_samples=0))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["metadata"]["init_from"] = "tiny"  # an adapter trained on the (now booby-trapped) tiny base
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    (adapter_dir / "summary.json").unlink()

    paths = {
        "--resume": lambda: train.train(finetune_config(small_base, resume_dir, resume=True)),
        "the tiny-base check of a default run": lambda: checkpoints.ensure_tiny_base(),
        "--prompt": lambda: chat.answer_prompt(ChatConfig(adapter="none", prompt="Hi", device="cpu")),
        "--adapter --prompt": lambda: chat.answer_prompt(
            ChatConfig(adapter=str(adapter_dir), prompt="Hi", device="cpu")
        ),
        "--init_from a checkpoint": lambda: checkpoints.load_checkpoint_model(str(resume_dir)),
    }
    for name, load in paths.items():
        with pytest.raises(UserError, match="more than tensors and plain containers"):
            load()
        assert not marker.exists(), f"{name} ran code from a checkpoint"


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated", bytes(range(256)) * 8, "héllo wörld".encode("latin-1")],
    ids=["zero bytes", "truncated zip", "random bytes", "latin-1 text"],
)
def test_unreadable_checkpoints_are_named(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"{path} is not a readable checkpoint"):
        checkpoints.load_checkpoint_model(str(path))


def test_truncated_checkpoint_is_named_on_resume(tmp_path):
    cfg = tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1)
    train.train(cfg)
    whole = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="ckpt.pt is not a readable checkpoint .*truncated"):
        train.train(tiny_pretrain_config(tmp_path, max_iters=4, eval_interval=2, eval_batches=1, resume=True))


def test_a_huge_learning_rate_stops_the_run_without_saving_nan(tmp_path):
    with pytest.raises(
        UserError,
        match=r"^step 1: the validation loss is (nan|inf): training diverged, so it stops here and "
        r"nothing of this run was saved; try a lower --learning_rate \(this run: 1e\+06\)",
    ):
        train.train(tiny_pretrain_config(tmp_path, learning_rate=1e6, max_iters=6, eval_interval=1, eval_batches=1))
    assert sorted(os.listdir(tmp_path)) == []  # no checkpoint, log or summary (and the lock is released)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from model import GPT

    real_forward, training_forwards = GPT.forward, []

    def nan_at_step_3(self, idx, targets=None, kv_cache=None, segment_ids=None):  # in training (evaluation: eval mode)
        logits, loss = real_forward(self, idx, targets, kv_cache, segment_ids)
        training_forwards.extend([1] if self.training else [])
        return logits, loss * float("nan") if len(training_forwards) == 3 and self.training else loss

    common = dict(max_iters=6, eval_interval=1, eval_batches=1)
    monkeypatch.setattr(GPT, "forward", nan_at_step_3)
    with pytest.raises(
        UserError,
        match=r"^step 3: the training loss is nan and the gradient norm nan: training diverged, so it "
        r"stops here and .* keeps the checkpoint of step 2",
    ):
        train.train(tiny_pretrain_config(tmp_path, **common))
    monkeypatch.setattr(GPT, "forward", real_forward)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "summary.json").exists()
    log = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(log) == 2 and all(math.isfinite(float(r["train_loss"])) for r in log)
    summary = train.train(tiny_pretrain_config(tmp_path, resume=True, **common))  # the last good checkpoint goes on
    assert (
        math.isfinite(summary["val_loss_after"]) and json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    )


def test_summary_json_never_holds_nan(tmp_path):
    with pytest.raises(ValueError, match="not writing .*summary.json"):
        write_json_atomic({"val_loss_after": float("nan")}, str(tmp_path / "summary.json"))
    assert os.listdir(tmp_path) == []


def test_defaults_give_the_tiny_base_many_small_steps_and_others_sixteen_a_batch():
    tiny = resolve_defaults(TrainConfig())
    assert (tiny.batch_size, tiny.max_iters, tiny.group_by_length) == (8, 4200, True)
    assert (
        resolve_defaults(TrainConfig(init_from="gpt2")).batch_size,
        resolve_defaults(TrainConfig(init_from="scratch", dataset="stdlib")).batch_size,
    ) == (16, 16)
    assert resolve_defaults(TrainConfig(batch_size=4)).batch_size == 4  # a value given is kept


def test_train_fills_in_the_defaults_of_a_config_given_straight(small_base, tmp_path):
    """A program may hand train() a TrainConfig without resolve_defaults: batch_size 0 must not reach the data."""
    cfg = TrainConfig(
        init_from=small_base,
        out_dir=str(tmp_path),
        lora_rank=4,
        lora_targets="q,v",
        max_iters=2,
        eval_interval=2,
        eval_batches=1,
        num_samples=0,
        answer_limit=4,
        max_new_tokens=8,
        progress=False,
        device="cpu",
    )
    summary = train.train(cfg)
    assert (summary["config"]["batch_size"], summary["lora_alpha"], summary["steps"]) == (8, 8.0, 2)


BAD_FLAGS = [  # (flags, what the one-line error must say)
    (["--grad_accum", "0"], "--grad_accum 0: use an integer >= 1"),
    (["--grad_accum", "-2"], "--grad_accum -2: use an integer >= 1"),
    (["--max_iters", "-5"], "--max_iters -5: use an integer >= 0"),
    (["--batch_size", "-1"], "--batch_size -1: use an integer >= 0 (0 = the default for the job)"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    (["--lora_alpha", "nan"], "--lora_alpha nan: must be a finite number"),
    (["--lora_alpha", "inf"], "--lora_alpha inf: must be a finite number"),
    (["--weight_decay", "nan"], "--weight_decay nan: must be a finite number"),
    (["--loraplus_ratio", "nan"], "--loraplus_ratio nan: must be a finite number"),
    (["--lora_dropout", "1.5"], "--lora_dropout 1.5: use a number in [0, 1)"),
    (["--lora_targets", "all-linear,zz"], "unknown LoRA target 'zz'"),
    (["--block_size", "128"], "--block_size 128 shapes a model trained from scratch"),
    (["--device", "gpu"], "--device 'gpu': use auto, cuda (or cuda:N), mps or cpu"),
    # issue 26: accepted silently, or a message that named neither the flag nor the fix
    (["--answer_limit", "-1"], "--answer_limit -1: use an integer >= 0"),
    (["--lora_alpha", "1e30"], "--lora_alpha 1e+30 with --lora_rank 32 scales the update by 3.125e+28; use an alpha"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(flags, message, monkeypatch):
    # --init_from a missing path: had the flag been accepted, the run would stop at loading the base instead
    exit_message = run_main(
        "train.py", "--init_from", "/nonexistent/base", "--no-progress", *flags, monkeypatch=monkeypatch
    )
    assert exit_message.startswith("error: ") and "\n" not in exit_message
    assert message in exit_message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(monkeypatch):
    exit_message = run_main("train.py", "--init_from", "/nonexistent/base", "--device", "cuda", monkeypatch=monkeypatch)
    assert exit_message.startswith("error: --device cuda: this PyTorch sees no CUDA GPU")


def write_examples(path, examples):
    path.write_text(json.dumps(examples))
    return str(path)


def test_datasets_that_leave_a_split_empty_are_clear_errors(small_base, tmp_path):
    few = write_examples(
        tmp_path / "few.json", [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]
    )
    with pytest.raises(
        UserError,
        match=r"has 12 examples, which the 85/5/10 split cuts into 10 train / 0 validation / 2 test.*at least 20",
    ):
        train.train(finetune_config(small_base, tmp_path / "out", dataset=few))
    long_test = [
        {"instruction": f"Say {i}.", "input": "", "output": str(i) if i < 18 else "x" * 500} for i in range(20)
    ]
    with pytest.raises(UserError, match=r"all 2 test examples are longer than the model's context of 384 tokens"):
        train.train(
            finetune_config(small_base, tmp_path / "out", dataset=write_examples(tmp_path / "long.json", long_test))
        )
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"instruction": "Café?", "output": "oui"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1} is not valid UTF-8"):
        train.train(finetune_config(small_base, tmp_path / "out", dataset=str(latin1)))


def test_resume_refuses_other_model_or_optimizer_settings(small_base, tmp_path):
    train.train(finetune_config(small_base, tmp_path, max_iters=4, eval_interval=2))
    changed = dict(lora_targets="k,o", lora_alpha=4.0, quantize="nf4", pack=True, prompt_template="alpaca")
    with pytest.raises(UserError) as refused:
        train.train(finetune_config(small_base, tmp_path, max_iters=4, eval_interval=2, resume=True, **changed))
    message = refused.value.args[0]
    assert message.startswith("--resume: ") and "--lora_targets q,v (now k,o)" in message
    assert (
        "--lora_alpha 8 (now 4.0)" in message
        and "--quantize none (now nf4)" in message
        and "--lora_rank" not in message
    )
    assert (
        "--pack False (now True)" in message and "--prompt_template auto (now alpaca)" in message
    )  # other batches, other prompts
    with pytest.raises(UserError, match="--init_from"):
        train.train(finetune_config(small_base + "/ckpt.pt", tmp_path, max_iters=4, eval_interval=2, resume=True))


def test_resume_loads_strictly(small_base, tmp_path):
    train.train(finetune_config(small_base, tmp_path, max_iters=4, eval_interval=2))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["trainable"].pop(next(iter(ckpt["trainable"])))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="ckpt.pt does not fit this model: 1 trained tensors missing"):
        train.train(finetune_config(small_base, tmp_path, max_iters=6, eval_interval=2, resume=True))


def hold_lock(directory):
    """A forked process that takes directory's run lock and sleeps until killed, as a run that trains there does."""
    import multiprocessing

    taken = multiprocessing.get_context("fork").Event()

    def hold():
        with lock_out_dir(str(directory)):
            taken.set()
            time.sleep(600)

    holder = multiprocessing.get_context("fork").Process(target=hold, daemon=True)
    holder.start()
    assert taken.wait(30)
    return holder


def test_one_run_owns_an_out_dir_until_its_process_ends_however_it_ends(tmp_path, capsys):
    """The lock is the kernel's (flock): a second run is refused while the first holds it, and a run killed with
    SIGKILL leaves nothing that stops the next one, which removes the half-written files of dead writers."""
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(
            UserError, match=f"in use by another run or export \\(process {holder.pid}, see .*run.lock\\)"
        ):
            train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1))
    finally:
        os.kill(
            holder.pid, signal.SIGKILL
        )  # no finally in the holder, no cleanup: its lock file stays, but not its lock
        holder.join()
    alive, dead = os.getppid(), dead_pid()
    (tmp_path / f"ckpt.pt.{dead}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f"notes.txt.{alive}.tmp").write_text("a live process's temporary file")
    train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1))
    assert f"ckpt.pt.{dead}.tmp" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt.pt", "log.csv", "loss.png", "summary.json", f"notes.txt.{alive}.tmp"]
    )


def test_a_lock_file_naming_a_live_process_that_holds_no_lock_does_not_block(tmp_path):
    """A pid file cannot tell a run from whatever process got its id after a crash or a reboot; a kernel lock can."""
    (tmp_path / "run.lock").write_text(f"{os.getppid()}\n")  # alive, and no run
    train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1))
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "run.lock").exists()


def test_runs_racing_for_a_folder_with_a_stale_lock_never_both_own_it(tmp_path):
    """Eight processes start at one barrier on a folder whose lock file a dead process left, ten times: at no moment do
    two of them hold the folder (the pid-file lock gave a stale lock to two racers at once: on the code before issue 26
    this test failed in 5 of 8 runs)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")

    def contender(barrier, events):
        barrier.wait()
        try:
            with lock_out_dir(str(tmp_path / "race")):
                events.put(("in", os.getpid(), time.monotonic()))
                time.sleep(0.2)
                events.put(("out", os.getpid(), time.monotonic()))
        except UserError:
            events.put(("refused", os.getpid(), time.monotonic()))

    for trial in range(10):
        (tmp_path / "race").mkdir(exist_ok=True)
        (tmp_path / "race" / "run.lock").write_text(f"{dead_pid()}\n")
        barrier, events = fork.Barrier(8), fork.Queue()
        racers = [fork.Process(target=contender, args=(barrier, events)) for _ in range(8)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        spans, seen = {}, []
        while len([e for e in seen if e[0] != "in"]) < 8:
            seen.append(events.get(timeout=30))
        for kind, pid, at in seen:
            spans.setdefault(pid, {})[kind] = at
        held = sorted((s["in"], s["out"]) for s in spans.values() if "in" in s)
        assert held, f"trial {trial}: nobody got the folder"
        assert all(a[1] <= b[0] for a, b in zip(held, held[1:])), f"trial {trial}: two owners at once: {held}"


def dead_pid():
    """The id of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_fresh_run_replaces_the_earlier_runs_files_and_the_adapter_names_its_own_base(
    small_base, tmp_path, crash_after_checkpoint
):
    """A LoRA run finishes; a QLoRA run in the same folder is killed after its first checkpoint. --adapter must load
    the QLoRA adapter onto a 4-bit base: the earlier run's summary.json (which says 'lora') is gone."""
    from quantize import Linear4bit

    train.train(finetune_config(small_base, tmp_path, max_iters=2, eval_interval=2, num_samples=0))
    crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(finetune_config(small_base, tmp_path, quantize="nf4", max_iters=4, eval_interval=2, num_samples=0))
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "run.lock").exists()
    model, _ = checkpoints.load_finetuned(str(tmp_path), "tiny", "cpu")
    assert any(isinstance(m, Linear4bit) for m in model.modules())


def test_files_of_two_runs_are_not_loaded_as_one(small_base, tmp_path):
    train.train(finetune_config(small_base, tmp_path / "a", max_iters=2, eval_interval=2, num_samples=0))
    train.train(finetune_config(small_base, tmp_path / "b", max_iters=2, eval_interval=2, num_samples=0))
    (tmp_path / "b" / "summary.json").replace(tmp_path / "a" / "summary.json")
    with pytest.raises(UserError, match="summary.json is from run .* but the adapter in .* from run"):
        checkpoints.load_finetuned(str(tmp_path / "a"), "tiny", "cpu")


def test_cuda_random_state_is_saved_and_restored(tmp_path, monkeypatch):
    """No GPU here: stand-ins for the CUDA generator functions record what train.py does with them."""
    state, restored = [torch.arange(16, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=1, eval_batches=1))
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["cuda_rng"][0], state[0])
    resume.restore_random_state({"rng": torch.get_rng_state(), "cuda_rng": state}, "cpu")
    assert restored == []  # a CPU run leaves CUDA alone
    resume.restore_random_state(torch.load(tmp_path / "ckpt.pt", weights_only=True), "cuda")
    assert len(restored) == 1 and torch.equal(restored[0][0], state[0])


def test_killed_at_random_points_and_resumed_a_run_ends_as_if_never_killed(small_base, tmp_path):
    """Fault injection: SIGKILL a training process at random moments (twice per seed), start again (--resume once a
    checkpoint exists), and require the log, adapter and answers of an uninterrupted run. The processes are forked
    from this one, so each start costs no fresh `import torch`. (This is also the test that a resumed LoRA run, with
    dropout, follows the uninterrupted trajectory bit for bit; pretraining's is test_resume_continues_...)"""
    import multiprocessing
    import random
    import signal
    import time

    settings = dict(max_iters=6, eval_interval=2, eval_batches=1, lora_dropout=0.1, num_samples=1, max_new_tokens=4)
    started = time.time()
    train.train(finetune_config(small_base, tmp_path / "straight", **settings))
    duration = time.time() - started
    fork = multiprocessing.get_context("fork")
    for seed in range(3):
        rng, out = random.Random(seed), tmp_path / f"killed-{seed}"
        for _ in range(2):
            child = fork.Process(
                target=train.train,
                args=(finetune_config(small_base, out, resume=(out / "ckpt.pt").exists(), **settings),),
            )
            child.start()
            time.sleep(rng.uniform(0, duration))
            os.kill(child.pid, signal.SIGKILL)  # a no-op if it already finished
            child.join()
        train.train(finetune_config(small_base, out, resume=(out / "ckpt.pt").exists(), **settings))
        leftovers = [name for name in os.listdir(out) if name.endswith(".tmp") or name == "run.lock"]
        assert leftovers == [], f"seed {seed}"
        for name in ("adapter_model.safetensors", "samples.json"):
            assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), f"seed {seed}: {name}"
        log = lambda d: [
            {k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(d / "log.csv"))
        ]
        assert log(out) == log(tmp_path / "straight"), f"seed {seed}"


# ------------------------------------------------------------------------------------- issue 26
# Each test below failed on the code before issue 26 (an export over the run it came from, a base re-pretrained under
# an adapter, data that crashed the run after training, a full disk that mixed two steps, ...).


def test_bad_data_is_refused_before_training_and_the_earlier_run_stays(small_base, tmp_path):
    run = tmp_path / "run"
    train.train(finetune_config(small_base, run, max_iters=2, eval_interval=2, num_samples=0, answer_limit=4))
    kept = {p.name: p.read_bytes() for p in run.iterdir()}
    examples = json.load(open(instruction_files.EMBEDDED_INSTRUCTIONS_PATH))[:40]
    for key, value in (("answer", 5), ("kind", ["a", "b"])):
        bad = [dict(ex) for ex in examples]
        bad[-1][key] = value  # a test example: only scoring the answers after training would meet it
        path = write_examples(tmp_path / f"{key}.json", bad)
        with pytest.raises(ValueError, match=f"entry 39 has '{key}'"):
            train.train(finetune_config(small_base, run, dataset=path, max_iters=2, eval_interval=2, answer_limit=4))
        with pytest.raises(ValueError, match=f"entry 39 has '{key}'"):
            chat.answer_file(
                ChatConfig(
                    adapter=str(run),
                    answer_file=path,
                    answers_out=str(tmp_path / "a.json"),
                    max_new_tokens=4,
                    device="cpu",
                )
            )
        assert {p.name: p.read_bytes() for p in run.iterdir()} == kept and not (tmp_path / "a.json").exists()


def test_an_adapter_is_refused_on_another_base_at_its_path(small_base, tmp_path, monkeypatch):
    """The base is pretrained again (here: one weight changed) where the adapter's metadata points: loading refuses,
    naming both fingerprints, instead of answering with logits of another model."""
    base = tmp_path / "base"
    shutil.copytree(small_base, base)
    run = tmp_path / "run"
    train.train(finetune_config(str(base), run, max_iters=2, eval_interval=2, num_samples=0, answer_limit=4))
    checkpoints.load_finetuned(str(run), "tiny", "cpu")  # its own base: fine
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.fc_in.weight"][0, 0] += 0.01
    torch.save(ckpt, base / "ckpt.pt")
    with pytest.raises(
        UserError,
        match=f"the adapter in {run} was trained on a base whose weights have fingerprint [0-9a-f]{{16}}, "
        f"but {base} now holds weights [0-9a-f]{{16}}",
    ):
        checkpoints.load_finetuned(str(run), "tiny", "cpu")
    exit_message = run_main("chat.py", "--adapter", str(run), "--prompt", "Hi", monkeypatch=monkeypatch)
    assert (
        exit_message.startswith(f"error: the adapter in {run} was trained on a base whose weights")
        and "\n" not in exit_message
    )


def test_a_missing_base_is_an_error_never_a_pretraining(small_base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.train(finetune_config(small_base, run, max_iters=2, eval_interval=2, num_samples=0, answer_limit=4))
    config = json.loads((run / "adapter_config.json").read_text())
    config["metadata"]["init_from"] = "tiny"  # an adapter of the default tiny base, which this checkout lacks
    (run / "adapter_config.json").write_text(json.dumps(config))
    (run / "summary.json").unlink()
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(tmp_path / "no-tiny-base"))
    monkeypatch.setattr(checkpoints, "run_script", lambda *args: pytest.fail(f"a pretraining started: {args}"))
    for name, call in {
        "--adapter --prompt": lambda: chat.answer_prompt(ChatConfig(adapter=str(run), prompt="Hi", device="cpu")),
        "--prompt": lambda: chat.answer_prompt(ChatConfig(adapter="none", prompt="Hi", device="cpu")),
        "--hf": lambda: export.export_run(export.parse_args(["--adapter", str(run), "--hf", str(tmp_path / "hf")])),
    }.items():
        with pytest.raises(
            (UserError, FileNotFoundError), match="no tiny base model at .*no-tiny-base/ckpt.pt: pretrain it first"
        ):
            call()
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_no_progress_reaches_the_pretraining_of_a_missing_base(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(tmp_path / "tiny-base"))
    started = []

    def pretraining(script, settings):
        started.append(settings)
        raise UserError("stopped before pretraining")

    monkeypatch.setattr(checkpoints, "run_script", pretraining)
    with pytest.raises(UserError, match="stopped before pretraining"):
        train.prepare_model(resolve_defaults(TrainConfig(progress=False, device="cpu")), "cpu")
    assert started[0]["progress"] is False and started[0]["init_from"] == "scratch"


def test_a_full_disk_leaves_the_last_steps_files_whole(small_base, tmp_path, monkeypatch):
    """The disk fills up while step 4's checkpoint is written, after its adapter: the adapter, checkpoint and log of
    step 2 stay, together (before, the adapter of step 4 sat beside the checkpoint of step 2), and the error is one
    line that says what happened."""
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iter") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(
        UserError, match=r"^cannot write .*ckpt.pt: No space left on device \(the disk is full: free some space"
    ):
        train.train(finetune_config(small_base, tmp_path, max_iters=4, eval_interval=2, num_samples=0, answer_limit=4))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    adapter_step = json.loads((tmp_path / "adapter_config.json").read_text())["metadata"]["step"]
    assert ckpt["iter"] == adapter_step == 2 and len(list(csv.DictReader(open(tmp_path / "log.csv")))) == 2
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp") or name == "run.lock"]
    checkpoints.load_finetuned(str(tmp_path), "tiny", "cpu")  # a pair of one save
    summary = train.train(
        finetune_config(small_base, tmp_path, max_iters=4, eval_interval=2, num_samples=0, answer_limit=4, resume=True)
    )
    assert summary["steps"] == 4


def test_a_fresh_run_removes_every_file_of_an_earlier_run(small_base, tmp_path):
    train.train(finetune_config(small_base, tmp_path, max_iters=2, eval_interval=2, num_samples=0, answer_limit=4))
    assert (tmp_path / "answers.csv").exists()
    train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1))  # writes no answers
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.csv", "loss.png", "summary.json"]


def test_a_failed_run_leaves_no_empty_folders(small_base, tmp_path):
    bad = write_examples(tmp_path / "bad.json", [{"instruction": "x"}])
    with pytest.raises(ValueError, match="no non-empty string 'output'"):
        train.train(finetune_config(small_base, tmp_path / "new" / "a" / "b", dataset=bad))
    assert os.listdir(tmp_path) == ["bad.json"]


def test_a_read_only_out_dir_is_one_line(small_base, tmp_path, monkeypatch):
    real_makedirs, out_dir = os.makedirs, tmp_path / "read-only" / "run"

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "read-only")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    exit_message = run_main(
        "train.py",
        "--init_from",
        small_base,
        "--out_dir",
        str(out_dir),
        "--no-progress",
        "--device",
        "cpu",
        monkeypatch=monkeypatch,
    )
    assert exit_message == (
        f"error: cannot write {out_dir}: Read-only file system (the file system is read-only: choose a folder "
        f"you can write to); the files there before are as they were"
    )


def test_resume_that_would_train_nothing_is_refused(tmp_path):
    train.train(tiny_pretrain_config(tmp_path, max_iters=4, eval_interval=2, eval_batches=1))
    with pytest.raises(
        UserError,
        match=r"--resume: .*ckpt.pt is at step 4, past --max_iters 2, so there is nothing to train; "
        r"give a --max_iters above 4",
    ):
        train.train(tiny_pretrain_config(tmp_path, max_iters=2, eval_interval=2, eval_batches=1, resume=True))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4  # the finished run's summary stays


def test_a_run_killed_between_its_last_checkpoint_and_its_log_is_completed_by_resume(tmp_path, monkeypatch):
    """A run killed while its last step's files are written (here: log.csv) keeps the previous step's ckpt.pt and log
    together; --resume runs the last steps again and leaves the whole log, as the uninterrupted run does."""
    cfg = dict(max_iters=4, eval_interval=2, eval_batches=1)
    train.train(tiny_pretrain_config(tmp_path / "straight", **cfg))
    real_log = reports.write_train_log

    def log_unless_last(rows, cfg_, mode):
        if rows[-1]["iter"] == 4:
            raise KeyboardInterrupt  # killed right after the last checkpoint
        real_log(rows, cfg_, mode)

    monkeypatch.setattr(reports, "write_train_log", log_unless_last)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_pretrain_config(tmp_path / "killed", **cfg))
    monkeypatch.setattr(reports, "write_train_log", real_log)
    assert len(list(csv.DictReader(open(tmp_path / "killed" / "log.csv")))) == 2
    train.train(tiny_pretrain_config(tmp_path / "killed", resume=True, **cfg))
    rows = lambda d: [
        {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / d / "log.csv"))
    ]
    assert rows("killed") == rows("straight")
