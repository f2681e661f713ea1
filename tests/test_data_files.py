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
NEW_QUESTIONS = (
    DATA / "new_questions.json"
)  # hand-written, for --answer_file: same kinds, new items, some new phrasings
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
        assert set(ex) == {"instruction", "input", "output", "kind", "answer", "item", "phrasing"}, ex
        assert all(isinstance(v, str) for v in ex.values()), ex
        assert ex["instruction"].strip() and ex["output"].strip() and ex["answer"].strip(), ex
        assert ex["phrasing"] in ("trained", "held_out"), ex
    pairs = [(ex["instruction"], ex["input"]) for ex in examples]
    duplicates = [p for p, c in Counter(pairs).items() if c > 1]
    assert not duplicates, duplicates[:5]


def test_every_output_contains_its_key_answer(examples):
    from support.answers import contains_answer

    for ex in examples:
        assert contains_answer(ex["output"], ex["answer"]), ex


def bare_phrasing(ex):
    """The instruction with its item, quotes, numbers, case of the first letter and final mark taken out."""
    text = ex["instruction"]
    for part in sorted(re.split(r", | or ", ex["item"]) + [ex["item"]], key=len, reverse=True):
        text = text.replace(part, "#")
    text = re.sub(r"\d+", "#", text.replace('"', "").replace("'", ""))
    return (text[:1].lower() + text[1:]).rstrip(".?!") + ("+input" if ex["input"] else "")


def test_instructions_variety(examples):
    """Dozens of phrasings of every kind among the training examples, some with the item in the input field."""
    from support.instruction_files import split_examples

    train = split_examples(examples)[0]
    kinds = Counter(ex["kind"] for ex in examples)
    assert len(kinds) >= 20 and min(kinds.values()) >= 50, kinds
    for kind in kinds:
        mine = of_kind(train, kind)
        assert len({bare_phrasing(ex) for ex in mine}) >= 30, kind
        assert 0.1 < sum(bool(ex["input"]) for ex in mine) / len(mine) < 0.9, kind


def leaked(trained, test):
    """Test examples whose prompt, or whose item within its kind, is among the trained examples."""
    seen_prompts = {prompt(ex) for ex in trained}
    seen_items = {(ex["kind"], ex["item"]) for ex in trained}
    return [ex for ex in test if prompt(ex) in seen_prompts or (ex["kind"], ex["item"]) in seen_items]


def test_test_split_items_are_never_trained_on(examples):
    """The split rule: no test prompt, and no test item (word, number, pair, list, sentence, country, animal) of a kind,
    in the train or validation part; every kind is in the test split, the fact kinds included."""
    from support.instruction_files import split_examples
    from support.instructions import FACT_KINDS

    train, val, test = split_examples(examples)
    assert not leaked(train + val, test)
    assert {ex["kind"] for ex in test} == {ex["kind"] for ex in examples} >= set(FACT_KINDS)
    # the check can fail: the same item asked in other words, or the same prompt, counts as seen
    rephrased = dict(test[0], instruction="Tell me about it.", input=test[0]["item"])
    assert leaked(train + [rephrased], test) == [test[0]]
    assert leaked(train + [dict(test[1], item="something else")], test) == [test[1]]


SLOTS = {
    "q": r"""(?:"[^"]*"|'[^']*'|[^\s"']+)""",
    "v": r"(?:[\w-]+, [\w-]+, [\w-]+|[A-Z]\w*(?: [A-Z]\w*)*|[\w-]+)",
    "a": r"\d+",
    "b": r"\d+",
    "art": r"an?",
}


def template_pattern(template):
    """A phrasing template (data/make_instructions.phrasings) as a regular expression over instructions, its slots
    standing for the values they take, its first letter's case and final mark free (the surface variation)."""
    text = (template[:1].lower() + template[1:]).rstrip(".?!")
    parts = re.split(r"\{(\w+)\}", text)
    return "".join(SLOTS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))


def matches(ex, patterns):
    text = ex["instruction"]
    text = (text[:1].lower() + text[1:]).rstrip(".?!")
    return [p for p, in_input in patterns if bool(ex["input"]) == in_input and re.fullmatch(p, text)]


def test_held_out_phrasings_are_never_trained_on(examples):
    """The phrasing split: no train or validation example is worded like any of its kind's held-out phrasings; every
    kind is tested in both; a test example tagged held-out is worded like a held-out phrasing and like no trained one."""
    from support.instruction_files import split_examples

    gen = load_script("make_instructions")
    train, val, test = split_examples(examples)
    for kind in gen.KINDS:
        trained, held_out = ([(template_pattern(t), in_input) for t, in_input in part] for part in gen.phrasings(kind))
        assert len(trained) >= 40 and len(held_out) >= 20, kind
        assert not [ex for ex in of_kind(train + val, kind) if matches(ex, held_out)]
        assert all(matches(ex, trained) for ex in of_kind(train + val, kind))
        tested = Counter(ex["phrasing"] for ex in of_kind(test, kind))
        assert tested["trained"] >= 5 and tested["held_out"] >= 5, (kind, tested)
        for ex in of_kind(test, kind):
            assert bool(matches(ex, held_out)) == (ex["phrasing"] == "held_out") != bool(matches(ex, trained)), ex


# ---------------------------------------------------------------------------------------------
# the key answers, recomputed from the prompt by rules written here, apart from the generator's


def numbers_in(ex):
    return [int(x) for x in re.findall(r"\d+", prompt(ex))]


def listed(ex):
    """The three words or numbers of a list kind, as the prompt shows them."""
    found = re.findall(r"[\w-]+, [\w-]+, [\w-]+", prompt(ex))
    assert len(found) == 1, ex
    return found[0].split(", ")


def plural_of(noun):
    return re.sub(r"([sxz]|[cs]h)$", r"\1e", re.sub(r"([^aeiou])y$", r"\1ie", noun)) + "s"


def with_ending(word, ending):  # past tense "ed", comparative "er", superlative "est"
    if word.endswith("e"):
        return word + ending[1:]
    return re.sub(r"([^aeiou])y$", r"\1i", word) + ending


RULES = {  # kind -> (the answer the example must have, from the prompt) ; item checked to be in the prompt first
    "plural": lambda ex: plural_of(ex["item"]),
    "singular": lambda ex: ex["answer"] if plural_of(ex["answer"]) == ex["item"] else None,  # "horses" <- horse or hors
    "past_tense": lambda ex: with_ending(ex["item"], "ed"),
    "comparative": lambda ex: with_ending(ex["item"], "er"),
    "superlative": lambda ex: with_ending(ex["item"], "est"),
    "uppercase": lambda ex: ex["item"].upper(),
    "first_letter": lambda ex: ex["item"][0],
    "parity": lambda ex: ("even", "odd")[numbers_in(ex)[0] % 2],
    "next_number": lambda ex: str(numbers_in(ex)[0] + 1),
    "larger": lambda ex: str(max(numbers_in(ex))),
    "smaller": lambda ex: str(min(numbers_in(ex))),
    "commas": lambda ex: f"{numbers_in(ex)[0]:,}",
    "sort_words": lambda ex: ", ".join(sorted(listed(ex))),
    "sort_numbers": lambda ex: ", ".join(sorted(listed(ex), key=int)),
    "reverse_words": lambda ex: ", ".join(listed(ex)[::-1]),
    "first_word": lambda ex: ex["item"].split()[0],
    "last_word": lambda ex: ex["item"].rstrip(".").split()[-1],
    "count_words": lambda ex: str(len(ex["item"].split())),
    "sentence_type": lambda ex: {".": "statement", "?": "question", "!": "exclamation"}[ex["item"][-1]],
}


def test_rule_answers_follow_from_the_prompt(answered):
    """Every rule kind's key answer is what the rule gives for the item the prompt shows (the item itself is checked
    to stand in the prompt); the fact kinds' answers are typed, not computed, and not checked here."""
    checked = Counter()
    for ex in answered:
        if ex["kind"] in RULES:
            item = ex["item"].split(" or ")  # a pair of numbers: both stand in the prompt
            assert all(part in prompt(ex) for part in item), ex
            assert ex["answer"] == RULES[ex["kind"]](ex), ex
            checked[ex["kind"]] += 1
    present = {ex["kind"] for ex in answered} & set(RULES)
    assert set(checked) == present and len(present) >= 8


def test_sentence_rules(answered):
    examples = answered
    for ex in of_kind(examples, "question"):
        statement, question = ex["item"].rstrip("."), ex["answer"].rstrip("?")
        assert statement in prompt(ex), ex
        assert sorted(question.lower().split()) == sorted(statement.lower().split()), ex
        assert question.split()[0].lower() in statement.split(" ") and ex["answer"].endswith("?"), ex
    for ex in of_kind(examples, "negation"):
        assert ex["item"] in prompt(ex), ex
        assert ex["answer"].replace(" not", "").replace("cannot", "can") == ex["item"], ex


def test_rule_checks_catch_a_wrong_answer():
    """The checks above can fail: one wrong letter, number or order is caught, kind by kind."""
    cases = [
        {"kind": "plural", "item": "box", "instruction": "Plural of box?", "input": "", "answer": "boxs"},
        {"kind": "past_tense", "item": "cry", "instruction": "Past of cry?", "input": "", "answer": "cryed"},
        {"kind": "smaller", "item": "12 or 7", "instruction": "Smaller: 12 or 7?", "input": "", "answer": "12"},
        {
            "kind": "sort_words",
            "item": "pear, apple, fig",
            "instruction": "Sort.",
            "input": "pear, apple, fig",
            "answer": "apple, pear, fig",
        },
        {
            "kind": "count_words",
            "item": "We ate the cake.",
            "instruction": "Count.",
            "input": "We ate the cake.",
            "answer": "3",
        },
    ]
    for ex in cases:
        assert RULES[ex["kind"]](ex) != ex["answer"], ex


def test_new_questions_ask_about_items_the_data_set_never_does(examples):
    """data/new_questions.json tests the trained adapter on new items: none is an item of its kind in instructions.json,
    and it covers every kind. The questions written after the first 21 (for the kinds added since) say so."""
    with open(NEW_QUESTIONS, encoding="utf-8") as f:
        new = json.load(f)
    seen = {(ex["kind"], ex["item"].lower()) for ex in examples}
    assert [ex for ex in new if (ex["kind"], ex["item"].lower()) in seen] == []
    assert {ex["kind"] for ex in new} == {ex["kind"] for ex in examples}
    assert all(set(ex) - {"added"} == {"instruction", "input", "kind", "answer", "item"} for ex in new)
    assert [ex for ex in new if "added" not in ex][:21] == [ex for ex in new[:21]]  # the original 21 come first


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


@pytest.mark.parametrize(
    "script, filename", [("make_instructions.py", "instructions.json"), ("make_sms_sample.py", "sms_sample.tsv")]
)
def test_regeneration_is_byte_identical(tmp_path, script, filename):
    subprocess.run(
        [sys.executable, str(DATA / script), "--out", str(tmp_path)], check=True, capture_output=True, timeout=60
    )
    assert (tmp_path / filename).read_bytes() == (DATA / filename).read_bytes()


def test_free_sentences_vary_what_the_sentence_kinds_ask(tmp_path):
    """--free_sentences: the sentence kinds' answers can no longer be picked from a short list. In the committed file
    the last word is one of 14 and the word count one of 4 values; in the free file both spread wide, questions come
    in several shapes, every rule answer still follows from the prompt, and the file keeps its kinds and its size."""
    subprocess.run(
        [sys.executable, str(DATA / "make_instructions.py"), "--free_sentences", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    free = json.loads((tmp_path / "instructions.json").read_text(encoding="utf-8"))
    committed = json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))

    def spread(data, kind):
        return len({ex["answer"] for ex in of_kind(data, kind)})

    assert spread(committed, "last_word") <= 14 and spread(free, "last_word") >= 100
    assert spread(committed, "count_words") <= 4 and spread(free, "count_words") >= 7
    assert spread(free, "first_word") >= 3 * spread(committed, "first_word")
    questions = [ex["item"] for ex in of_kind(free, "sentence_type") if ex["answer"] == "question"]
    assert {q.split()[0] for q in questions} >= {"Did", "Where", "Why"}
    for ex in free:
        if ex["kind"] in RULES:
            assert ex["answer"] == RULES[ex["kind"]](ex), ex
    assert Counter(ex["kind"] for ex in free).keys() == Counter(ex["kind"] for ex in committed).keys()
    assert len(free) == len(committed)
