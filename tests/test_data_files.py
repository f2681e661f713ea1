"""Checks for the two offline datasets in data/ and the scripts that generate them."""

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
INSTRUCTIONS = DATA / "instructions.json"
NEW_QUESTIONS = DATA / "new_questions.json"  # hand-written, for --answer_file: same kinds, new items, some new phrasings
SMS = DATA / "sms_sample.tsv"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples():
    with open(INSTRUCTIONS, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=[INSTRUCTIONS, NEW_QUESTIONS], ids=["instructions", "new_questions"])
def answered(request):
    """Both files whose key answers the rule checks below recompute."""
    with open(request.param, encoding="utf-8") as f:
        return json.load(f)


def prompt(ex):
    return ex["instruction"] + " " + ex["input"]


def of_kind(examples, kind):
    found = [ex for ex in examples if ex["kind"] == kind]
    assert found, f"no examples of kind {kind!r}"
    return found


# ---------------------------------------------------------------------------------------------
# instructions.json: structure

def test_instructions_structure(examples):
    assert isinstance(examples, list) and len(examples) >= 1500
    for ex in examples:
        assert set(ex) == {"instruction", "input", "output", "kind", "answer", "item"}, ex
        assert all(isinstance(v, str) for v in ex.values()), ex
        assert ex["instruction"].strip() and ex["output"].strip() and ex["answer"].strip(), ex
    pairs = [(ex["instruction"], ex["input"]) for ex in examples]
    duplicates = [p for p, c in Counter(pairs).items() if c > 1]
    assert not duplicates, duplicates[:5]


def test_every_output_contains_its_key_answer(examples):
    from support.instructions import contains_answer

    for ex in examples:
        assert contains_answer(ex["output"], ex["answer"]), ex


def test_instructions_variety(examples):
    kinds = Counter(ex["kind"] for ex in examples)
    assert len(kinds) >= 12 and min(kinds.values()) >= 50, kinds
    for kind in kinds:  # several phrasings of every kind
        assert len({ex["instruction"].split('"')[0][:12] for ex in of_kind(examples, kind)}) >= 3, kind


def leaked(trained, test):
    """Test examples whose prompt, or whose item within its kind, is among the trained examples."""
    seen_prompts = {prompt(ex) for ex in trained}
    seen_items = {(ex["kind"], ex["item"]) for ex in trained}
    return [ex for ex in test if prompt(ex) in seen_prompts or (ex["kind"], ex["item"]) in seen_items]


def test_test_split_items_are_never_trained_on(examples):
    """The split rule: no test prompt, and no test item (word, number, pair, sentence, country, animal) of a kind, in
    the train or validation part; every kind is in the test split, the fact kinds included."""
    from support.instructions import FACT_KINDS, split_examples

    train, val, test = split_examples(examples)
    assert not leaked(train + val, test)
    assert {ex["kind"] for ex in test} == {ex["kind"] for ex in examples} >= set(FACT_KINDS)
    # the check can fail: the same item asked in other words, or the same prompt, counts as seen
    rephrased = dict(test[0], instruction="Tell me about it.", input=test[0]["item"])
    assert leaked(train + [rephrased], test) == [test[0]]
    assert leaked(train + [dict(test[1], item="something else")], test) == [test[1]]


# ---------------------------------------------------------------------------------------------
# instructions.json: answers recomputed from the prompt text, independently of the generator

def word_in_prompt(ex):
    m = re.search(r'"([^"]+)"', ex["instruction"])
    if m:
        return m.group(1)
    if ex["input"]:
        return ex["input"]
    return re.search(r"\bword (\w+)", ex["instruction"]).group(1)  # 'Give the plural of the word box.


def test_word_rules(answered):
    examples = answered
    for kind, ending in (("plural", ("s",)), ("past_tense", ("d",)), ("comparative", ("r",))):
        for ex in of_kind(examples, kind):
            word, answer = word_in_prompt(ex), ex["answer"]
            assert word == ex["item"] and answer.endswith(ending), ex
            stem = word[:-1] if word.endswith(("y", "e")) else word
            assert answer.startswith(stem) and len(answer) - len(word) in (1, 2, 3), ex
    for ex in of_kind(examples, "uppercase"):
        assert ex["answer"] == word_in_prompt(ex).upper(), ex


def test_number_rules(answered):
    examples = answered
    for ex in of_kind(examples, "parity"):
        n = int(re.search(r"\d+", prompt(ex)).group())
        assert ex["answer"] == ("even" if n % 2 == 0 else "odd"), ex
    for ex in of_kind(examples, "next_number"):
        assert int(ex["answer"]) == int(re.search(r"\d+", prompt(ex)).group()) + 1, ex
    for ex in of_kind(examples, "larger"):
        assert int(ex["answer"]) == max(int(x) for x in re.findall(r"\d+", prompt(ex))), ex
    for ex in of_kind(examples, "commas"):
        digits = re.search(r"\d+", prompt(ex)).group()
        assert ex["answer"].replace(",", "") == digits and all(len(g) == 3 for g in ex["answer"].split(",")[1:]), ex


def test_sentence_rules(answered):
    examples = answered
    for ex in of_kind(examples, "question"):
        statement, question = ex["input"].rstrip("."), ex["answer"].rstrip("?")
        subject_and_rest = statement.split(" ")
        assert sorted(question.lower().split()) == sorted(statement.lower().split()), ex
        assert question.split()[0].lower() in subject_and_rest and ex["answer"].endswith("?"), ex
    for ex in of_kind(examples, "negation"):
        assert ex["answer"].replace(" not", "").replace("cannot", "can") == ex["input"], ex
    for ex in of_kind(examples, "last_word"):
        assert ex["answer"] == ex["input"].rstrip(".").split()[-1], ex


def test_new_questions_ask_about_items_the_data_set_never_does(examples):
    """data/new_questions.json tests the trained adapter on new items: none is an item of its kind in instructions.json,
    and it covers every kind."""
    with open(NEW_QUESTIONS, encoding="utf-8") as f:
        new = json.load(f)
    seen = {(ex["kind"], ex["item"].lower()) for ex in examples}
    assert [ex for ex in new if (ex["kind"], ex["item"].lower()) in seen] == []
    assert {ex["kind"] for ex in new} == {ex["kind"] for ex in examples}
    assert all(set(ex) == {"instruction", "input", "kind", "answer", "item"} for ex in new)


# ---------------------------------------------------------------------------------------------
# sms_sample.tsv

def read_sms():
    lines = SMS.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "file should end with a newline"
    return lines[0], [line.split("\t") for line in lines[1:-1]]


def test_sms_format():
    header, rows = read_sms()
    assert header == "Label\tSMS"
    assert len(rows) >= 500
    for row in rows:
        assert len(row) == 2, f"expected label<TAB>text, got {row!r}"
        assert row[0] in ("ham", "spam"), row
        assert row[1].strip() and "\r" not in row[1], row
    counts = Counter(label for label, _ in rows)
    assert counts["ham"] >= 200 and counts["spam"] >= 200, counts
    texts = [text for _, text in rows]
    assert len(set(texts)) == len(texts), "duplicate messages"
    assert any(not t.isascii() for t in texts), "expected some non-ASCII (Unicode) messages"
    assert any("&lt;" in t for t in texts) and any('"' in t for t in texts)


# ---------------------------------------------------------------------------------------------
# Regenerating gives byte-identical files

@pytest.mark.parametrize("script, filename", [("make_instructions.py", "instructions.json"),
                                              ("make_sms_sample.py", "sms_sample.tsv")])
def test_regeneration_is_byte_identical(tmp_path, script, filename):
    subprocess.run([sys.executable, str(DATA / script), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / filename).read_bytes() == (DATA / filename).read_bytes()
