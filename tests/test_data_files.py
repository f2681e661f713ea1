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


@pytest.fixture(scope="module")
def tagged():
    """(kind, example) pairs from the generator, in file order."""
    return load_script("make_instructions").build_examples()


def of_kind(tagged, kind):
    found = [ex for k, ex in tagged if k == kind]
    assert found, f"no examples of kind {kind!r}"
    return found


def prompt(ex):
    return ex["instruction"] + " " + ex["input"]


# ---------------------------------------------------------------------------------------------
# instructions.json: structure

def test_instructions_structure(examples):
    assert isinstance(examples, list)
    assert len(examples) >= 600
    for ex in examples:
        assert set(ex) == {"instruction", "input", "output"}, ex
        assert all(isinstance(v, str) for v in ex.values()), ex
        assert ex["instruction"].strip() and ex["output"].strip(), ex
    pairs = [(ex["instruction"], ex["input"]) for ex in examples]
    duplicates = [p for p, c in Counter(pairs).items() if c > 1]
    assert not duplicates, duplicates[:5]


def test_instructions_variety(examples, tagged):
    assert [ex for _, ex in tagged] == examples, "generator output differs from the committed file"
    kinds = Counter(kind for kind, _ in tagged)
    assert len(kinds) >= 12
    assert min(kinds.values()) >= 20, kinds
    short = sum(len(ex["output"]) < 120 for ex in examples)
    assert short / len(examples) > 0.9


# ---------------------------------------------------------------------------------------------
# instructions.json: answers recomputed from the prompt text

ARITHMETIC_PATTERNS = [
    (r"What is (\d+) \+ (\d+)\?", "+"), (r"Add (\d+) and (\d+)\.", "+"),
    (r"sum of (\d+) and (\d+)", "+"), (r"^\S.*?\s(\d+) \+ (\d+)$", "+"),
    (r"What is (\d+) - (\d+)\?", "-"), (r"^\S.*?\s(\d+) - (\d+)$", "-"),
    (r"What is (\d+) times (\d+)\?", "*"), (r"Multiply (\d+) by (\d+)\.", "*"),
    (r"product of (\d+) and (\d+)", "*"), (r"^\S.*?\s(\d+) × (\d+)$", "*"),
]


def arithmetic_answer(ex):
    """Recompute the result from the prompt; None if the prompt matches no known form."""
    text = prompt(ex)
    subtract = re.search(r"Subtract (\d+) from (\d+)\.", text)
    if subtract:
        return int(subtract.group(2)) - int(subtract.group(1))
    for pattern, op in ARITHMETIC_PATTERNS:
        m = re.search(pattern, text)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            return a + b if op == "+" else a - b if op == "-" else a * b
    return None


def arithmetic_is_correct(ex):
    expected = arithmetic_answer(ex)
    assert expected is not None, f"could not parse arithmetic prompt {ex!r}"
    return int(re.findall(r"-?\d+", ex["output"])[-1]) == expected


def test_arithmetic_checker_rejects_wrong_answers():
    assert arithmetic_is_correct({"instruction": "What is 7 + 5?", "input": "", "output": "7 + 5 = 12."})
    assert not arithmetic_is_correct({"instruction": "What is 7 + 5?", "input": "", "output": "7 + 5 = 13."})
    assert not arithmetic_is_correct({"instruction": "Subtract 5 from 12.", "input": "", "output": "12 minus 5 equals 8."})
    assert arithmetic_is_correct({"instruction": "Solve.", "input": "6 × 7", "output": "6 × 7 = 42."})


def test_arithmetic_answers(tagged):
    for ex in of_kind(tagged, "arithmetic"):
        assert arithmetic_is_correct(ex), ex


FACTORS = {  # to-units per from-unit, written independently of the generator
    ("kilometers", "meters"): 1000, ("meters", "centimeters"): 100,
    ("centimeters", "millimeters"): 10, ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
    ("days", "hours"): 24, ("weeks", "days"): 7, ("feet", "inches"): 12, ("yards", "feet"): 3,
    ("meters", "kilometers"): 1 / 1000, ("grams", "kilograms"): 1 / 1000,
    ("minutes", "hours"): 1 / 60,
}
PLURAL = {"kilometer": "kilometers", "meter": "meters", "centimeter": "centimeters",
          "millimeter": "millimeters", "kilogram": "kilograms", "gram": "grams", "liter": "liters",
          "milliliter": "milliliters", "hour": "hours", "minute": "minutes", "second": "seconds",
          "day": "days", "week": "weeks", "foot": "feet", "inch": "inches", "yard": "yards"}


def test_unit_conversions(tagged):
    for ex in of_kind(tagged, "unit_conversion"):
        m = re.fullmatch(r"([\d.]+) (\w+) is ([\d.]+) (\w+)\.", ex["output"])
        assert m, ex
        value, src, result, dst = float(m.group(1)), m.group(2), float(m.group(3)), m.group(4)
        src, dst = PLURAL.get(src, src), PLURAL.get(dst, dst)
        assert re.search(rf"(?<![\d.]){re.escape(m.group(1))} {m.group(2)}\b", prompt(ex)), ex
        assert dst in prompt(ex), ex
        assert result == pytest.approx(value * FACTORS[(src, dst)]), ex


def test_temperatures(tagged):
    for ex in of_kind(tagged, "temperature"):
        numbers = [int(x) for x in re.findall(r"-?\d+", ex["output"])]
        assert len(numbers) == 2 and str(numbers[0]) in prompt(ex), ex
        if re.search(r"Celsius to Fahrenheit|Celsius in Fahrenheit", ex["instruction"]):
            celsius, fahrenheit = numbers
        else:
            fahrenheit, celsius = numbers
        assert fahrenheit == celsius * 9 / 5 + 32, ex


def test_number_classifications(tagged):
    for ex in of_kind(tagged, "even_odd"):
        n = int(re.search(r"\d+", prompt(ex)).group())
        assert (" even " in ex["output"]) == (n % 2 == 0), ex
        assert (" odd " in ex["output"]) == (n % 2 == 1), ex
    for ex in of_kind(tagged, "compare_numbers"):
        a, b = (int(x) for x in re.findall(r"\d+", prompt(ex)))
        first = int(re.match(r"\d+", ex["output"]).group())
        assert first == (max(a, b) if "larger" in ex["instruction"] else min(a, b)), ex


def test_word_counts_and_sorting(tagged):
    for ex in of_kind(tagged, "word_count"):
        assert int(re.search(r"\d+", ex["output"]).group()) == len(ex["input"].split()), ex
    for ex in of_kind(tagged, "alphabetical_sort"):
        words = ex["input"].split(", ")
        assert ex["output"] == "In alphabetical order: " + ", ".join(sorted(words)) + ".", ex


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
