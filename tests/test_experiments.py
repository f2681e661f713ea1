"""experiments/: the structure-vs-knowledge experiment's data split and format check."""
import re

from experiments.structure_vs_knowledge import KINDS, build, shape_pattern


def test_seen_items_are_tested_in_a_new_phrasing_and_unseen_items_never_trained():
    train, tests = build(seed=0, per_kind=20)
    trained_prompts = {(ex["instruction"], ex["input"]) for ex in train}
    trained_items = {(ex["kind"], ex["item"]) for ex in train}
    assert set(tests) == {(kind, part) for kind in KINDS for part in ("seen", "unseen")}
    for (kind, part), examples in tests.items():
        assert len(examples) == 10
        for ex in examples:
            assert (ex["instruction"], ex["input"]) not in trained_prompts
            assert ((kind, ex["item"]) in trained_items) == (part == "seen")


def test_format_pattern_accepts_the_trained_shape_with_any_item_and_answer():
    ex = {"output": 'The plural of "box" is "boxes".', "answer": "boxes", "item": "box"}
    pattern = shape_pattern(ex)
    assert re.fullmatch(pattern, 'The plural of "fox" is "foxs".')  # wrong content, right shape
    assert not re.fullmatch(pattern, "boxes")
    assert not re.fullmatch(pattern, 'The plural of "fox" is "foxes". And more.')
