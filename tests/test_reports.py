"""support/reports.py: the answer table train.py prints at the end of a run, with held-out phrasings scored apart."""

from support.answers import score_responses
from support.reports import answer_report, print_answer_table


def table(examples, before, after, capsys):
    fields, by_kind, _ = answer_report(examples, before, after)
    print_answer_table(by_kind, fields)
    return capsys.readouterr().out.splitlines()


def test_data_without_kinds_prints_its_total_once(capsys):
    """instruction-data and alpaca have no 'kind': every example counts under 'all', which is also the total row."""
    examples = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe")]
    lines = table(examples, ["", "", ""], ["yes", "no", "perhaps"], capsys)
    rows = [line.split() for line in lines if line.startswith("  ") and not line.strip().startswith("kind")]
    assert [row[0] for row in rows] == ["all"]
    assert rows[0][:2] == ["all", "3"] and rows[0][-1] == "0.67"  # exact match after: 2 of 3


def test_data_with_kinds_prints_each_kind_and_the_total(capsys):
    examples = [
        {"instruction": "Plural of 'cat'?", "input": "", "output": "cats", "answer": "cats", "kind": "plural"},
        {"instruction": "Capital of France?", "input": "", "output": "Paris", "answer": "Paris", "kind": "capital"},
    ]
    lines = table(examples, ["", ""], ["cats", "Lyon"], capsys)
    names = [line.split()[0] for line in lines if line.startswith("  ") and not line.strip().startswith("kind")]
    assert names == ["capital", "plural", "all"]
    assert score_responses(examples, ["cats", "Lyon"])[0]["accuracy"] == 0.5


def example(kind, answer, phrasing):
    return {
        "instruction": f"a {kind} question",
        "input": "",
        "output": f"It is {answer}.",
        "answer": answer,
        "kind": kind,
        "phrasing": phrasing,
    }


def test_held_out_phrasings_are_scored_apart_overall_and_per_kind(capsys):
    examples = [
        example("parity", "even", "trained"),
        example("parity", "odd", "trained"),
        example("parity", "odd", "held_out"),
        example("capital", "Lima", "held_out"),
        example("capital", "Oslo", "held_out"),
        example("plural", "cats", "trained"),
    ]
    before = ["no"] * 6
    after = ["It is even.", "It is even.", "It is odd.", "Lima", "Paris", "It is cats."]
    fields, by_kind, records = answer_report(examples, before, after)
    # trained phrasings: parity 1 of 2, plural 1 of 1 -> 2/3; held-out phrasings: parity 1 of 1, capital 1 of 2 -> 2/3
    assert fields["test_accuracy_after"] == 2 / 3 and fields["test_accuracy_new_phrasings"] == 2 / 3
    assert fields["test_accuracy_before"] == 0 and fields["test_accuracy_new_phrasings_before"] == 0
    rows = {row["kind"]: row for row in by_kind}
    assert (rows["parity"]["examples"], rows["parity"]["accuracy_after"]) == (2, 0.5)
    assert (rows["parity"]["examples_new_phrasings"], rows["parity"]["accuracy_new_phrasings"]) == (1, 1.0)
    assert (rows["capital"]["examples"], rows["capital"]["accuracy_after"]) == (
        0,
        None,
    )  # asked only in held-out phrasings
    assert (rows["capital"]["examples_new_phrasings"], rows["capital"]["accuracy_new_phrasings"]) == (2, 0.5)
    assert (rows["plural"]["examples_new_phrasings"], rows["plural"]["accuracy_new_phrasings"]) == (0, None)
    assert all(set(row) == set(by_kind[0]) for row in by_kind)  # one set of columns for answers.csv
    assert [r["correct_after"] for r in records] == [True, False, True, True, False, True]
    print_answer_table(by_kind, fields)
    table = capsys.readouterr().out
    assert "new phrasings" in table and "0.67" in table


def test_without_phrasing_tags_every_example_counts_as_before():
    examples = [
        {"instruction": "q", "output": "It is even.", "answer": "even", "kind": "parity"},
        {"instruction": "q", "output": "It is odd.", "answer": "odd", "kind": "parity"},
    ]
    fields, by_kind, _ = answer_report(examples, ["x", "x"], ["even", "even"])
    assert fields["test_accuracy_after"] == 0.5 and "test_accuracy_new_phrasings" not in fields
    assert list(by_kind[0]) == [
        "kind",
        "examples",
        "accuracy_before",
        "accuracy_after",
        "exact_match_before",
        "exact_match_after",
        "f1_before",
        "f1_after",
    ]
