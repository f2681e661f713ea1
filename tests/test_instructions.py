"""instructions.py: the prompt format, the collate function's padding and masking, loading and its errors."""
import json

import pytest
import torch

from conftest import shared_data
from instructions import (PROMPT_HEADER, collate, contains_answer, exact_match, format_prompt, load_examples, score_responses,
                          split_examples, token_f1, tokenize_examples, validate_examples)
from tokenizer import ByteTokenizer


def test_prompt_format_with_and_without_input():
    with_input = format_prompt({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n")
    without = format_prompt({"instruction": "Name a colour.", "input": "", "output": "Red."})
    assert "### Input:" not in without and without.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


def test_collate_pads_and_masks_exactly():
    # two sequences: [prompt 1 2 3 | response 4 5 | eot 9] and [prompt 6 7 | response 8 | eot 9]
    batch = [([1, 2, 3, 4, 5, 9], 3), ([6, 7, 8, 9], 2)]
    inputs, targets = collate(batch, pad_token=9)
    assert torch.equal(inputs, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 9]]))
    assert torch.equal(targets, torch.tensor([[2, 3, 4, 5, 9], [7, 8, 9, -100, -100]]))
    inputs, targets = collate(batch, pad_token=9, mask_prompt=True)
    assert torch.equal(inputs, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 9]]))
    # targets that are still prompt tokens (2, 3 and 7) are ignored; the first response token is still predicted
    assert torch.equal(targets, torch.tensor([[-100, -100, 4, 5, 9], [-100, 8, 9, -100, -100]]))


def test_tokenize_drops_overlong_examples_with_a_count():
    tok = ByteTokenizer()
    examples = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "x" * 500, "input": "", "output": "y"}]
    kept, dropped = tokenize_examples(examples, tok, max_length=200)
    assert dropped == 1 and len(kept) == 1
    ids, prompt_length = kept[0]
    assert tok.decode(ids[:prompt_length]) == format_prompt(examples[0])
    assert ids[prompt_length:] == tok.encode("Hi.") + [tok.eot_token]


@pytest.mark.parametrize("bad, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "entry 1 has no non-empty string 'output'"),
    ([{"instruction": "a", "output": "b", "input": 3}], "entry 0 has an 'input' that is not a string"),
    (["just text"], "entry 0 is a str"),
    ([], "non-empty JSON list"),
])
def test_malformed_entries_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_examples(bad, "test.json")


def test_bad_dataset_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="'embedded', 'instruction-data', 'alpaca'"):
        load_examples("no-such-dataset")
    broken = tmp_path / "broken.json"
    broken.write_text("[{]")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_examples(str(broken))


def test_embedded_set_split():
    train, val, test = split_examples(load_examples("embedded"))
    assert len(train) + len(val) + len(test) >= 500
    assert len(val) > 0 and len(test) > len(val)


def test_real_instruction_set_loads_and_splits():
    examples = load_examples(shared_data("instruction-data.json"))
    assert len(examples) == 1100
    train, val, test = split_examples(examples)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    kept, dropped = tokenize_examples(train, ByteTokenizer(), max_length=513)
    assert len(kept) + dropped == 935 and dropped < 935 * 0.2


def test_compact_template_is_alpaca_without_its_preamble():
    ex = {"instruction": "Translate.", "input": "chat", "output": "cat"}
    assert format_prompt(ex, "compact") == "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n"
    assert format_prompt(ex, "alpaca") == PROMPT_HEADER + "\n\n" + format_prompt(ex, "compact")
    with pytest.raises(ValueError, match="use one of alpaca, compact"):
        format_prompt(ex, "chatml")


@pytest.mark.parametrize("response, answer, correct", [
    ('The plural of "box" is "boxes".', "boxes", True),     # the answer inside a longer sentence, quoted
    ("BOXES!", "boxes", True),                              # case and punctuation do not matter
    ('The plural of "box" is "boxs".', "boxes", False),     # a wrong answer
    ("", "boxes", False),                                   # an empty response
    ("The number after 119 is 120.", "20", False),          # a number inside another number is not the answer
    ("1234567 is written 1234567.", "1,234,567", False),    # separators inside a word are kept
    ("The capital of Peru is Lima.", "Lima", True),
    ("Can the dog swim?", "Can the dog swim?", True),       # a whole-sentence answer
    ("The dog can swim?", "Can the dog swim?", False),
    ('In capital letters: "PEPPER".', "PEPPER", True),      # an answer in capitals must be in capitals
    ('In capital letters: "pepper".', "PEPPER", False),
])
def test_contains_answer_on_hand_made_responses(response, answer, correct):
    assert contains_answer(response, answer) is correct


def test_exact_match_and_token_f1():
    assert exact_match('the plural of "box" is "boxes".', 'The plural of "box" is "boxes".')
    assert not exact_match("The plural is boxes.", 'The plural of "box" is "boxes".')
    assert token_f1("", "") == 1.0 and token_f1("", "a b") == 0.0 and token_f1("x y", "a b") == 0.0
    # 3 common words; precision 3/3, recall 3/4
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_score_responses_overall_and_per_kind():
    examples = [{"instruction": "q", "output": "It is even.", "answer": "even", "kind": "parity"},
                {"instruction": "q", "output": "It is odd.", "answer": "odd", "kind": "parity"},
                {"instruction": "q", "output": "Lima.", "answer": "Lima", "kind": "capital"},
                {"instruction": "q", "output": "A free answer."}]  # no key answer: exact match and F1 only
    overall, by_kind, rows = score_responses(examples, ["It is even.", "It is even.", "Paris", "A free answer."])
    assert overall["examples"] == 4 and overall["accuracy"] == pytest.approx(1 / 3) and overall["exact_match"] == 0.5
    assert by_kind["parity"]["accuracy"] == 0.5 and by_kind["capital"]["accuracy"] == 0.0
    assert by_kind["all"] == {"examples": 1, "exact_match": 1.0, "f1": 1.0}
    assert [r.get("correct") for r in rows] == [True, False, False, None]
    with pytest.raises(ValueError):
        score_responses(examples, ["one response too few"] * 3)
