"""train.py's DDP: under torchrun with 2 Gloo processes on the CPU, training follows the single-process trajectory: pretraining
from the start, and a QLoRA fine-tuning (LoRA adapters on a 4-bit base) resumed by 2 processes from a 1-process
checkpoint. (benchmarks/gpu_check.py runs 2 NCCL processes where a machine has 2 GPUs.)"""

import csv
import os
import subprocess
import sys

import pytest

import train
from support.cli import check_train_config
from train import TrainConfig, resolve_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = dict(
    init_from="scratch",
    dataset="stdlib",
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=64,
    batch_size=4,
    grad_accum=4,
    max_iters=6,
    eval_interval=3,
    eval_batches=2,
    learning_rate=3e-3,
    device="cpu",
    progress=False,
)


def test_a_grad_accum_the_processes_cannot_share_is_refused():
    check_train_config(resolve_defaults(TrainConfig(grad_accum=6)), "cpu", world_size=2)  # 3 micro-batches each
    with pytest.raises(ValueError, match="--grad_accum 5 must be a multiple of the 2 processes"):
        check_train_config(resolve_defaults(TrainConfig(grad_accum=5)), "cpu", world_size=2)
    with pytest.raises(ValueError, match="torchrun data parallelism runs on 'cuda' \\(NCCL\\) or 'cpu'"):
        check_train_config(resolve_defaults(TrainConfig(grad_accum=6)), "mps", world_size=2)


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
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
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

    assert json.load(open(tmp_path / "ddp" / "summary.json"))["val_loss_after"] == pytest.approx(
        single["val_loss_after"], rel=1e-5
    )


def test_a_qlora_run_resumed_by_two_processes_follows_the_single_process_trajectory(tmp_path, crash_after_checkpoint):
    """DDP with adapters on a frozen 4-bit base: only LoRA's A and B are all-reduced, the packed 4-bit buffers are the
    same on both ranks. A 1-process QLoRA run stopped after its checkpoint at step 2, resumed by 2 processes, ends where
    the uninterrupted single-process run does: losses, and the adapter that the last checkpoint holds."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=2, n_head=2, n_embd=32, smear_keys=True))
    torch.save(
        {
            "model_config": vars(base.config).copy(),
            "tokenizer": "bytes",
            "model": {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"},
        },
        tmp_path / "base.pt",
    )
    qlora = dict(
        init_from=str(tmp_path / "base.pt"),
        dataset="embedded",
        quantize="nf4",
        lora_rank=4,
        lora_targets="q,v,mlp_in",
        batch_size=4,
        grad_accum=4,
        max_iters=4,
        eval_interval=2,
        eval_batches=2,
        answer_limit=2,
        num_samples=0,
        max_new_tokens=4,
        learning_rate=3e-3,
        device="cpu",
        progress=False,
    )
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


# ---------------------------------------------------------------------------------------------------------
# issue 26: evaluation is shared by the ranks, so none waits in a collective while another evaluates alone

SHORT_TIMEOUT = """
import datetime, functools, os, sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds={timeout}))
import train
real = train.mean_token_loss
def slow(model, batches, device, rank=0, world_size=1):  # an evaluation that takes {per_batch} s per batch scored
    time.sleep({per_batch} * len(batches[rank::world_size]))
    return real(model, batches, device, rank, world_size)
train.mean_token_loss = slow
train.train(train.parse_args())
"""


def test_an_evaluation_longer_than_the_process_group_timeout_ends_no_run(tmp_path):
    """A 15 s process-group timeout and 20 validation batches of 1 s each: one rank evaluating alone for 20 s while
    the other waited in a collective ended the run; shared, each rank scores 10 batches (10 s), and they meet. (With an
    8 s timeout rank 0's first checkpoint save, plot included, could outlast it on its own: a flaky test, not the bug.)"""
    wrapper = tmp_path / "short_timeout.py"
    wrapper.write_text(SHORT_TIMEOUT.format(root=ROOT, timeout=15, per_batch=1.0))
    flags = {
        **FLAGS,
        "max_iters": 2,
        "eval_interval": 2,
        "eval_batches": 20,
        "grad_accum": 2,
        "out_dir": str(tmp_path / "ddp"),
    }
    argv = [
        part
        for key, value in flags.items()
        for part in ((f"--{key}" if value else f"--no-{key}",) if isinstance(value, bool) else (f"--{key}", str(value)))
    ]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper), *argv],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["iter"] for r in log(tmp_path / "ddp")] == ["1", "2"] and log(tmp_path / "ddp")[-1]["val_loss"] != ""


def evaluation_model():
    """A small byte-level GPT with weights large enough (std 0.3) that its greedy answers differ from prompt to prompt."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def shared_evaluation(rank, store, results):
    """One of two Gloo processes: the validation loss and greedy answers of a small model, each rank taking its share."""
    import torch
    import torch.distributed as dist

    from support.instruction_files import load_examples
    from support.tokenizer import ByteTokenizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = evaluation_model()
        batches = [(torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(i)),) * 2 for i in range(5)]
        batches = [(x, torch.where(x % 3 == 0, -100, x)) for x, _ in batches]  # a different number of targets per batch
        examples = load_examples("embedded")[:7]
        loss = train.mean_token_loss(model, batches, "cpu", rank, 2)
        settings = TrainConfig(max_new_tokens=6)
        answers = train.shared_answers(model, ByteTokenizer(), examples, "cpu", settings, "compact", rank, 2)
        results.put((rank, loss, answers))
    finally:
        dist.destroy_process_group()


def test_shared_evaluation_gives_what_one_process_computes(tmp_path):
    """Uneven shares (5 batches, 7 examples over 2 ranks): the gathered loss is one process's up to rounding, and the
    answers are the same, in the same order, on every rank."""
    import multiprocessing

    import torch

    from support.answers import answer_examples
    from support.instruction_files import load_examples
    from support.tokenizer import ByteTokenizer

    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    ranks = [fork.Process(target=shared_evaluation, args=(rank, tmp_path / "store", results)) for rank in (0, 1)]
    for p in ranks:
        p.start()
    got = sorted(results.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join()
    model = evaluation_model()
    batches = [(torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(i)),) * 2 for i in range(5)]
    batches = [(x, torch.where(x % 3 == 0, -100, x)) for x, _ in batches]
    answers = answer_examples(model, ByteTokenizer(), load_examples("embedded")[:7], "cpu", 6, "compact")
    assert got[0][1] == got[1][1] == pytest.approx(train.mean_token_loss(model, batches, "cpu"), rel=1e-6)
    assert got[0][2] == got[1][2] == answers and len(set(answers)) > 1
