"""experiments/: the structure-vs-knowledge experiment's data split and format check, the copy probe's scoring, LoRA
§7.2's subspace similarity."""

import math
import re

import pytest
import torch

from experiments.copy_probe import copy_losses
from experiments.structure_vs_knowledge import KINDS, build, shape_pattern
from experiments.subspace import subspace_similarity


def worded_like(ex, templates):
    """Whether the example's instruction is one of the templates with its item filled in (quoted or bare), up to the
    case of the first letter and the final mark."""
    item, art = ex["item"], "an" if ex["item"][0] in "aeiou" else "a"
    norm = lambda text: (text[:1].lower() + text[1:]).rstrip(".?!")  # noqa: E731
    return norm(ex["instruction"]) in {
        norm(t.format(v=item, q=q, art=art)) for t, _ in templates for q in (item, f'"{item}"', f"'{item}'")
    }


def test_seen_items_are_tested_in_new_prompts_and_unseen_items_and_phrasings_never_trained():
    """Every item is asked in a trained phrasing that item was not trained in, and in a held-out phrasing that no
    training example used (the generator's phrasing split); unseen items are never trained on."""
    from data.make_instructions import phrasings

    train, tests = build(seed=0, per_kind=20)
    trained_prompts = {(ex["instruction"], ex["input"]) for ex in train}
    trained_items = {(ex["kind"], ex["item"]) for ex in train}
    assert set(tests) == {
        (kind, items, phr) for kind in KINDS for items in ("seen", "unseen") for phr in ("seen", "new")
    }
    for (kind, items, phr), examples in tests.items():
        trained, held_out = phrasings(kind, 0)
        assert len(examples) == 10
        for ex in examples:
            assert (ex["instruction"], ex["input"]) not in trained_prompts
            assert ((kind, ex["item"]) in trained_items) == (items == "seen")
            assert worded_like(ex, held_out) == (phr == "new") and worded_like(ex, trained) == (phr == "seen"), ex
    assert not [ex for ex in train if worded_like(ex, phrasings(ex["kind"], 0)[1])]
    assert all(worded_like(ex, phrasings(ex["kind"], 0)[0]) for ex in train)


def test_format_pattern_accepts_the_trained_shape_with_any_item_and_answer():
    ex = {"output": 'The plural of "box" is "boxes".', "answer": "boxes", "item": "box"}
    pattern = shape_pattern(ex)
    assert re.fullmatch(pattern, 'The plural of "fox" is "foxs".')  # wrong content, right shape
    assert not re.fullmatch(pattern, "boxes")
    assert not re.fullmatch(pattern, 'The plural of "fox" is "foxes". And more.')


class PerfectCopier(torch.nn.Module):
    """Knows nothing but where the repeat starts: uniform over bytes in the first copy, certain of the next byte in the
    second. The copy probe must score it ~log(257) on the first copy and ~0 on the second."""

    def forward(self, idx):
        T = idx.size(1)
        logits = torch.zeros(1, T, 257)
        separator = next(t for t in range(T - 1) if idx[0, t] == ord(".") and idx[0, t + 1] == ord(" "))
        period = separator + 2
        for t in range(period, T):  # the target at t is the byte at t + 1, which also stood at t + 1 - period
            logits[0, t, idx[0, t + 1 - period]] = 50.0
        return logits, None


def test_copy_probe_separates_a_copier_from_the_first_copy():
    from support.tokenizer import get_tokenizer

    first, second = copy_losses(PerfectCopier(), get_tokenizer("bytes"), lists=4)
    assert abs(first - math.log(257)) < 1e-4 and second < 1e-6


# ---------------------------------------------------------------------------------------------------------
# subspace.py: LoRA §7.2's similarity of two adapters' subspaces


def test_subspace_similarity_with_itself():
    A = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for i in range(1, 9):
        assert subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-9)
    assert subspace_similarity(A, A, 2, 6) == pytest.approx(1.0, abs=1e-9)  # the top 2 lie inside the top 6
    assert subspace_similarity(A, 3 * A, 8, 8) == pytest.approx(1.0, abs=1e-9)


def test_subspace_similarity_random_subspaces():
    # E ||U1^T U2||_F^2 = i j / d for independent random subspaces, so phi ~ max(i, j) / d (std ~5% here)
    g = torch.Generator().manual_seed(0)
    d = 512
    A1, A2 = torch.randn(32, d, generator=g), torch.randn(32, d, generator=g)
    assert subspace_similarity(A1, A2, 32, 32) == pytest.approx(32 / d, rel=0.25)
    assert subspace_similarity(A1, A2, 16, 32) == pytest.approx(32 / d, rel=0.3)


def test_subspace_similarity_by_hand():
    # A1's strongest right singular vector is e2 (singular value 3); A2 spans (1, sqrt 3) / 2, at 30 degrees
    # from e2: phi(1, 1) = cos^2(30 deg) = 3/4; with both of A1's directions the plane contains it: phi = 1.
    A1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    A2 = torch.tensor([[1.0, math.sqrt(3.0)]], dtype=torch.float64)
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(0.75, abs=1e-12)
    assert subspace_similarity(A1, A2, 2, 1) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="1 <= j <= 1"):
        subspace_similarity(A1, A2, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# rank_sweep.py: the rank lab (--quick) and runs side by side (--jobs)


def test_quick_sets_the_lab_and_flags_given_still_win():
    from experiments import rank_sweep

    args = rank_sweep.parse_args(["--quick"])
    for name, value in rank_sweep.QUICK.items():
        assert getattr(args, name) == value, name
    assert 1 <= args.jobs <= 2
    args = rank_sweep.parse_args(["--quick", "--instruct_iters", "7", "--jobs", "1", "--out_dir", "elsewhere"])
    assert (args.instruct_iters, args.jobs, args.out_dir, args.ranks) == (7, 1, "elsewhere", rank_sweep.QUICK["ranks"])
    assert rank_sweep.parse_args([]).out_dir == "experiments/results" and rank_sweep.parse_args([]).jobs == 1


def test_a_sweep_side_by_side_writes_one_row_per_run_and_the_table(tmp_path, capsys):
    """Two runs of train.py at once (--jobs 2) on a small base: each row holds its own run's numbers (the adapter of
    rank 2 is twice rank 1's), each run's output is in its log, and the table lists what the lab promises."""
    import csv
    import os

    import train
    from experiments import rank_sweep

    base = str(tmp_path / "base")
    train.train(
        train.resolve_defaults(
            train.TrainConfig(
                init_from="scratch",
                dataset="stdlib",
                out_dir=base,
                n_layer=2,
                n_head=2,
                n_embd=32,
                block_size=256,
                batch_size=4,
                max_iters=2,
                eval_interval=2,
                eval_batches=1,
                progress=False,
                device="cpu",
            )
        )
    )
    out = tmp_path / "lab"
    rank_sweep.main(
        [
            "--task",
            "instruct",
            "--ranks",
            "1,2",
            "--targets",
            "q",
            "--instruct_iters",
            "2",
            "--answer_limit",
            "3",
            "--init_from",
            base,
            "--out_dir",
            str(out),
            "--name",
            "lab",
            "--jobs",
            "2",
            "--device",
            "cpu",
        ]
    )
    rows = list(csv.DictReader(open(out / "lab_instruct.csv")))
    assert [(r["rank"], r["targets"], r["steps"]) for r in rows] == [("1", "q", "2"), ("2", "q", "2")]
    assert (
        int(rows[1]["trainable_params"]) == 2 * int(rows[0]["trainable_params"]) == 2 * 2 * 2 * 32
    )  # n_layer r (d_in + d_out)
    for r in rows:
        run = out / "runs" / rank_sweep.run_name("instruct", int(r["rank"]), "q", 1337)
        summary = __import__("json").load(open(run / "summary.json"))
        assert float(r["metric"]) == summary["val_loss_after"] and summary["lora_alpha"] == 2 * int(r["rank"])
        assert float(r["seconds_per_step"]) == pytest.approx(summary["seconds"] / 2)
        assert int(r["adapter_bytes"]) == os.path.getsize(run / "adapter_model.safetensors")
        assert "validation loss before training" in open(str(run) + ".log").read()
        answered = __import__("json").load(open(run / "samples.json"))  # every answered example, both phrasings
        assert len(answered) == 3 and float(r["answer_accuracy"]) == pytest.approx(
            sum(ex["correct_after"] for ex in answered) / 3
        )
    assert (out / "lab_instruct.png").exists() and (out / "lab_instruct_accuracy.png").exists()
    table = capsys.readouterr().out.split("rank  targets")[-1]
    assert all(
        column in table
        for column in ("trainable", "val loss", "answers right", "s/step", "training state", "peak memory")
    )


def test_the_tiny_base_is_made_before_any_run_starts(tmp_path, monkeypatch):
    """Two runs started at once on a machine without the tiny base would both pretrain it into the same folder; the
    sweep makes (or checks) it first, in one process."""
    from experiments import rank_sweep

    started = []
    monkeypatch.setattr(rank_sweep, "run_script", lambda *args, **kwargs: started.append(args) or {})

    def no_base(device):
        raise RuntimeError(f"ensure_tiny_base({device!r}) called; runs started before it: {len(started)}")

    monkeypatch.setattr(rank_sweep, "ensure_tiny_base", no_base)
    with pytest.raises(RuntimeError, match="ensure_tiny_base\\('auto'\\) called; runs started before it: 0"):
        rank_sweep.main(["--quick", "--out_dir", str(tmp_path)])
