"""support/reports.py: the answers scored before and after, with held-out phrasings scored apart."""
from support.reports import answer_report, print_answer_table


def example(kind, answer, phrasing):
    return {"instruction": f"a {kind} question", "input": "", "output": f"It is {answer}.", "answer": answer, "kind": kind,
            "phrasing": phrasing}


def test_held_out_phrasings_are_scored_apart_overall_and_per_kind(capsys):
    examples = [example("parity", "even", "trained"), example("parity", "odd", "trained"), example("parity", "odd", "held_out"),
                example("capital", "Lima", "held_out"), example("capital", "Oslo", "held_out"), example("plural", "cats", "trained")]
    before = ["no"] * 6
    after = ["It is even.", "It is even.", "It is odd.", "Lima", "Paris", "It is cats."]
    fields, by_kind, records = answer_report(examples, before, after)
    # trained phrasings: parity 1 of 2, plural 1 of 1 -> 2/3; held-out phrasings: parity 1 of 1, capital 1 of 2 -> 2/3
    assert fields["test_accuracy_after"] == 2 / 3 and fields["test_accuracy_new_phrasings"] == 2 / 3
    assert fields["test_accuracy_before"] == 0 and fields["test_accuracy_new_phrasings_before"] == 0
    rows = {row["kind"]: row for row in by_kind}
    assert (rows["parity"]["examples"], rows["parity"]["accuracy_after"]) == (2, 0.5)
    assert (rows["parity"]["examples_new_phrasings"], rows["parity"]["accuracy_new_phrasings"]) == (1, 1.0)
    assert (rows["capital"]["examples"], rows["capital"]["accuracy_after"]) == (0, None)  # asked only in held-out phrasings
    assert (rows["capital"]["examples_new_phrasings"], rows["capital"]["accuracy_new_phrasings"]) == (2, 0.5)
    assert (rows["plural"]["examples_new_phrasings"], rows["plural"]["accuracy_new_phrasings"]) == (0, None)
    assert all(set(row) == set(by_kind[0]) for row in by_kind)  # one set of columns for answers.csv
    assert [r["correct_after"] for r in records] == [True, False, True, True, False, True]
    print_answer_table(by_kind, fields)
    table = capsys.readouterr().out
    assert "new phrasings" in table and "0.67" in table


def test_without_phrasing_tags_every_example_counts_as_before():
    examples = [{"instruction": "q", "output": "It is even.", "answer": "even", "kind": "parity"},
                {"instruction": "q", "output": "It is odd.", "answer": "odd", "kind": "parity"}]
    fields, by_kind, _ = answer_report(examples, ["x", "x"], ["even", "even"])
    assert fields["test_accuracy_after"] == 0.5 and "test_accuracy_new_phrasings" not in fields
    assert list(by_kind[0]) == ["kind", "examples", "accuracy_before", "accuracy_after", "exact_match_before",
                                "exact_match_after", "f1_before", "f1_after"]
