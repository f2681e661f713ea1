"""reports.py: the answer table train.py prints at the end of a run."""
from support.instructions import score_responses
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
    examples = [{"instruction": "Plural of 'cat'?", "input": "", "output": "cats", "answer": "cats", "kind": "plural"},
                {"instruction": "Capital of France?", "input": "", "output": "Paris", "answer": "Paris", "kind": "capital"}]
    lines = table(examples, ["", ""], ["cats", "Lyon"], capsys)
    names = [line.split()[0] for line in lines if line.startswith("  ") and not line.strip().startswith("kind")]
    assert names == ["capital", "plural", "all"]
    assert score_responses(examples, ["cats", "Lyon"])[0]["accuracy"] == 0.5
