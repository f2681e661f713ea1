"""experiments/: the structure-vs-knowledge experiment's data split and format check, the copy probe's scoring, LoRA
§7.2's subspace similarity."""
import math
import re

import pytest
import torch

from experiments.copy_probe import copy_losses
from experiments.subspace import subspace_similarity
from experiments.structure_vs_knowledge import KINDS, build, shape_pattern


def worded_like(ex, templates):
    """Whether the example's instruction is one of the templates with its item filled in (quoted or bare), up to the
    case of the first letter and the final mark."""
    item, art = ex["item"], "an" if ex["item"][0] in "aeiou" else "a"
    norm = lambda text: (text[:1].lower() + text[1:]).rstrip(".?!")  # noqa: E731
    return norm(ex["instruction"]) in {norm(t.format(v=item, q=q, art=art)) for t, _ in templates
                                       for q in (item, f'"{item}"', f"'{item}'")}


def test_seen_items_are_tested_in_new_prompts_and_unseen_items_and_phrasings_never_trained():
    """Every item is asked in a trained phrasing that item was not trained in, and in a held-out phrasing that no
    training example used (the generator's phrasing split); unseen items are never trained on."""
    from data.make_instructions import phrasings

    train, tests = build(seed=0, per_kind=20)
    trained_prompts = {(ex["instruction"], ex["input"]) for ex in train}
    trained_items = {(ex["kind"], ex["item"]) for ex in train}
    assert set(tests) == {(kind, items, phr) for kind in KINDS for items in ("seen", "unseen") for phr in ("seen", "new")}
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
