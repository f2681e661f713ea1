"""instructions.py: the prompt format, the collate function's padding and masking, loading and its errors."""

import json

import pytest
import torch
from conftest import shared_data

from support.answers import contains_answer, exact_match, score_responses, token_f1
from support.instruction_files import load_answer_file, load_examples, split_examples, validate_examples
from support.instructions import (
    CHAT_TEMPLATE,
    LENGTH_WINDOW,
    PROMPT_HEADER,
    InstructionData,
    chat_prompt,
    collate,
    collate_packed,
    example_prompt,
    format_prompt,
    pack_examples,
    resolve_template,
    tokenize_conversation,
    tokenize_examples,
)
from support.tokenizer import ByteTokenizer


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
    examples = [
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"instruction": "x" * 500, "input": "", "output": "y"},
    ]
    kept, dropped = tokenize_examples(examples, tok, max_length=200)
    assert dropped == 1 and len(kept) == 1
    ids, prompt_length = kept[0]
    assert tok.decode(ids[:prompt_length]) == format_prompt(examples[0])
    assert ids[prompt_length:] == tok.encode("Hi.") + [tok.eot_token]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "entry 1 has no non-empty string 'output'"),
        ([{"instruction": "a", "output": "b", "input": 3}], "entry 0 has an 'input' that is not a string"),
        (["just text"], "entry 0 is a str"),
        ([], "non-empty JSON list"),
    ],
)
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


# ---------------------------------------------------------------------------------------------- chat


class CharTokenizer:
    """One token per character (and <|endoftext|> = 0), so expected ids can be written by hand."""

    eot_token = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_chat_template_renders_as_documented_and_learns_assistant_turns_only():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ok"},
    ]
    tok = CharTokenizer()
    ids, learned = tokenize_conversation(messages, tok)
    text = "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nYo\0\n\n### User:\nBye\n\n### Assistant:\nOk\0"
    assert ids == [ord(c) for c in text]
    assert (
        "".join(chr(i) for i, keep in zip(ids, learned) if keep) == "Yo\0Ok\0"
    )  # content + end of each assistant turn
    # targets: the first learned target is "Y", predicted from the newline that ends "### Assistant:\n"
    inputs, targets = collate([(ids, learned)], pad_token=0, mask_prompt=True)
    kept = [(t, chr(inputs[0, i])) for i, t in enumerate(targets[0].tolist()) if t != -100]
    assert [chr(t) if t else "<eot>" for t, _ in kept] == ["Y", "o", "<eot>", "O", "k", "<eot>"]
    assert [previous for _, previous in kept] == ["\n", "Y", "o", "\n", "O", "k"]
    assert collate([(ids, learned)], pad_token=0)[1][0].tolist() == ids[1:]  # without mask_prompt: every token
    prompt, reference = chat_prompt(messages)
    assert prompt == text[: text.rindex("Ok")].replace("\0", "<|endoftext|>") and reference == "Ok"
    assert "### Assistant:" in CHAT_TEMPLATE and "<|endoftext|>" in CHAT_TEMPLATE


def test_chat_dataset_as_json_and_jsonl(tmp_path):
    conversations = [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
        for i in range(3)
    ]
    (tmp_path / "chat.json").write_text(json.dumps(conversations))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    assert load_examples(str(tmp_path / "chat.json")) == conversations == load_examples(str(tmp_path / "chat.jsonl"))
    kept, dropped = tokenize_examples(conversations, ByteTokenizer(), max_length=100)
    ids, learned = kept[0]
    assert dropped == 0 and ByteTokenizer().decode(ids) == "### User:\nSay 0.\n\n### Assistant:\n0<|endoftext|>"
    assert learned == [False] * (len(ids) - 2) + [True, True]
    (tmp_path / "broken.jsonl").write_text(json.dumps(conversations[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_examples(str(tmp_path / "broken.jsonl"))


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "Hi"}], "entry 0 has no assistant turn"),
        (
            [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            "message 0 has role 'human'; use one of system, user, assistant",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
            "message 1 \\(assistant\\) has no non-empty string 'content'",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Be nice."},
                {"role": "assistant", "content": "Yo"},
            ],
            "system message after the start",
        ),
        ([], "no non-empty 'messages' list"),
    ],
)
def test_malformed_conversations_are_named(messages, message):
    with pytest.raises(ValueError, match=message):
        validate_examples([{"messages": messages}], "chat.json")


# ---------------------------------------------------------------------------------------------- packing


def test_best_fit_decreasing_packing():
    examples = [([0] * (n + 1), 0) for n in (5, 3, 7, 2, 4, 6, 1)]  # n + 1 tokens take n input positions
    rows = pack_examples(examples, capacity=10)
    sizes = [[len(ids) - 1 for ids, _ in row] for row in rows]
    # 7 -> new row; 6 -> new row; 5 -> new row; 4 fits 6's row best (4 left: exactly); 3 fits 7's (3 left);
    # 2 fits 5's (5 left, the only room); 1 fits 5+2's row (3 left)
    assert sizes == [[7, 3], [6, 4], [5, 2, 1]]
    with pytest.raises(ValueError, match="cannot be packed into rows of 4 positions"):
        pack_examples(examples, capacity=4)


def test_collate_packed_keeps_each_example_as_collate_would():
    batch = [([1, 2, 3, 4, 5, 9], 3), ([6, 7, 8, 9], 2), ([5, 4, 9], 1)]
    inputs, targets, segments = collate_packed([[batch[0], batch[1]], [batch[2]]], pad_token=9, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [5, 4, 9, 9, 9, 9, 9, 9]]
    assert targets.tolist() == [[-100, -100, 4, 5, 9, -100, 8, 9], [4, 9, -100, -100, -100, -100, -100, -100]]
    assert segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_packed_loss_equals_unpacked_loss(mask_prompt):
    from model import GPT, GPTConfig

    tok = ByteTokenizer()
    from support.instruction_files import EMBEDDED_INSTRUCTIONS_PATH

    examples = json.load(open(EMBEDDED_INSTRUCTIONS_PATH))[:12] + [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ok"},
            ]
        }
    ]
    kept, dropped = tokenize_examples(examples, tok, max_length=385)
    assert dropped == 0 and len(kept) == 13
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=384, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    rows = pack_examples(kept, capacity=384)
    assert len(rows) < len(kept)  # several examples per row
    with torch.no_grad():
        x, y, segments = collate_packed(rows, tok.eot_token, mask_prompt)
        packed = model(x, y, segment_ids=segments)[1]
        unpacked = model(*collate(kept, tok.eot_token, mask_prompt))[1]
        without_segments = model(x)[0]  # packed rows without the mask and position restarts: examples see each other
        change = (without_segments - model(x, segment_ids=segments)[0]).abs().max().item()
    assert abs(packed.item() - unpacked.item()) <= 1e-5
    assert change > 1e-2


def test_group_by_length_keeps_every_example_and_cuts_the_padding():
    """--group_by_length (train.py's default) reorders the stream, nothing more: over whole windows the batches hold
    the same examples as the plain stream (across an epoch's end too), far less of each batch is padding, the batches
    of a window come in a shuffled order (not shortest first), and a batch depends on its step alone (--resume)."""
    tokenizer, steps, batch = ByteTokenizer(), 8 * LENGTH_WINDOW * 8, 8  # 4,096 examples: past the first epoch's 3,400
    plain, grouped = (
        InstructionData("embedded", tokenizer, 256, 1337, True, "bare", group_by_length=on) for on in (False, True)
    )

    def examples_and_padding(data):
        examples, padded, widths = [], 0, []
        for step in range(steps):
            x, _ = data.train_batch(step, 0, batch)
            lengths = (x != tokenizer.eot_token).sum(
                dim=1
            )  # the byte tokenizer's inputs hold no end-of-text but padding
            examples += [tuple(row[:n].tolist()) for row, n in zip(x, lengths)]
            padded, widths = padded + (x.numel() - lengths.sum().item()), widths + [x.size(1)]
        return sorted(examples), padded / (steps * batch * sum(widths) / len(widths)), widths

    same_plain, padding_plain, _ = examples_and_padding(plain)
    same_grouped, padding_grouped, widths = examples_and_padding(grouped)
    assert same_grouped == same_plain
    assert padding_plain > 0.15 and padding_grouped < 0.08  # measured: 0.22 and 0.05
    windows = [widths[i : i + LENGTH_WINDOW] for i in range(0, steps, LENGTH_WINDOW)]
    assert sum(window != sorted(window) for window in windows) > len(windows) // 2
    again = InstructionData("embedded", tokenizer, 256, 1337, True, "bare", group_by_length=True)
    assert all(torch.equal(a, b) for a, b in zip(again.train_batch(301, 0, batch), grouped.train_batch(301, 0, batch)))


def test_compact_template_is_alpaca_without_its_preamble():
    ex = {"instruction": "Translate.", "input": "chat", "output": "cat"}
    assert format_prompt(ex, "compact") == "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n"
    assert format_prompt(ex, "alpaca") == PROMPT_HEADER + "\n\n" + format_prompt(ex, "compact")
    with pytest.raises(ValueError, match="use one of alpaca, compact, bare"):
        format_prompt(ex, "chatml")


def test_bare_template_keeps_the_words_and_a_blank_line_before_the_response():
    with_input = {"instruction": "Translate.", "input": "chat", "output": "cat"}
    without_input = {"instruction": "Translate chat.", "input": "", "output": "cat"}
    assert format_prompt(with_input, "bare") == "Translate.\nchat\n\n"
    assert format_prompt(without_input, "bare") == "Translate chat.\n\n"
    # the tiny base reads it, GPT-2 keeps Alpaca's; every byte of compact's markers is gone
    assert resolve_template("auto", "bytes") == "bare" and resolve_template("auto", "gpt2") == "alpaca"
    assert len(format_prompt(with_input, "compact")) - len(format_prompt(with_input, "bare")) == 43


@pytest.mark.parametrize(
    "response, answer, correct",
    [
        ('The plural of "box" is "boxes".', "boxes", True),  # the answer inside a longer sentence, quoted
        ("BOXES!", "boxes", True),  # case and punctuation do not matter
        ('The plural of "box" is "boxs".', "boxes", False),  # a wrong answer
        ("", "boxes", False),  # an empty response
        ("The number after 119 is 120.", "20", False),  # a number inside another number is not the answer
        ("1234567 is written 1234567.", "1,234,567", False),  # separators inside a word are kept
        ("The capital of Peru is Lima.", "Lima", True),
        ("Can the dog swim?", "Can the dog swim?", True),  # a whole-sentence answer
        ("The dog can swim?", "Can the dog swim?", False),
        ('In capital letters: "PEPPER".', "PEPPER", True),  # an answer in capitals must be in capitals
        ('In capital letters: "pepper".', "PEPPER", False),
    ],
)
def test_contains_answer_on_hand_made_responses(response, answer, correct):
    assert contains_answer(response, answer) is correct


def test_exact_match_and_token_f1():
    assert exact_match('the plural of "box" is "boxes".', 'The plural of "box" is "boxes".')
    assert not exact_match("The plural is boxes.", 'The plural of "box" is "boxes".')
    assert token_f1("", "") == 1.0 and token_f1("", "a b") == 0.0 and token_f1("x y", "a b") == 0.0
    # 3 common words; precision 3/3, recall 3/4
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_score_responses_overall_and_per_kind():
    examples = [
        {"instruction": "q", "output": "It is even.", "answer": "even", "kind": "parity"},
        {"instruction": "q", "output": "It is odd.", "answer": "odd", "kind": "parity"},
        {"instruction": "q", "output": "Lima.", "answer": "Lima", "kind": "capital"},
        {"instruction": "q", "output": "A free answer."},
    ]  # no key answer: exact match and F1 only
    overall, by_kind, rows = score_responses(examples, ["It is even.", "It is even.", "Paris", "A free answer."])
    assert overall["examples"] == 4 and overall["accuracy"] == pytest.approx(1 / 3) and overall["exact_match"] == 0.5
    assert by_kind["parity"]["accuracy"] == 0.5 and by_kind["capital"]["accuracy"] == 0.0
    assert by_kind["all"] == {"examples": 1, "exact_match": 1.0, "f1": 1.0}
    assert [r.get("correct") for r in rows] == [True, False, False, None]
    with pytest.raises(ValueError):
        score_responses(examples, ["one response too few"] * 3)


def test_chat_examples_are_answered_and_scored_at_their_last_assistant_turn(tmp_path):
    conversation = {
        "messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    }
    alpaca = {"instruction": "Name a colour.", "output": "Red."}
    # the Alpaca template applies to Alpaca examples only; a conversation always uses CHAT_TEMPLATE
    assert example_prompt(alpaca, "compact") == (format_prompt(alpaca, "compact"), "Red.")
    assert (
        example_prompt(conversation, "compact")
        == example_prompt(conversation, "alpaca")
        == chat_prompt(conversation["messages"])
    )
    overall, by_kind, rows = score_responses([conversation, alpaca], ["lima", "Blue."])
    assert rows == [{"kind": "all", "exact_match": True, "f1": 1.0}, {"kind": "all", "exact_match": False, "f1": 0.0}]
    assert "accuracy" not in overall and overall["exact_match"] == 0.5  # no key answers: no accuracy
    path = tmp_path / "ask.jsonl"  # --answer_file reads chat files (and JSON Lines) as datasets are read
    path.write_text(json.dumps(conversation) + "\n" + json.dumps(conversation) + "\n")
    assert load_answer_file(str(path)) == [conversation, conversation]


def test_packing_uses_the_run_template():
    examples = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    tok = ByteTokenizer()
    for template in ("alpaca", "compact", "bare"):
        kept, _ = tokenize_examples(examples, tok, max_length=1025, template=template)
        rows = pack_examples(kept, capacity=1024)
        assert len(rows) == 1  # equal lengths: one row, in file order
        inputs, _, segments = collate_packed(rows, tok.eot_token)
        for i, ex in enumerate(
            examples
        ):  # each segment is its example's inputs: the prompt in this template, the output
            assert tok.decode(inputs[0][segments[0] == i].tolist()) == format_prompt(ex, template) + ex["output"]


# issue 26: every field is checked before anything trains (a non-string answer or kind crashed the run after training)
EOT = "<|endoftext|>"


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"instruction": "a", "output": "b", "answer": 5}], "entry 0 has 'answer': 5, but it must be a string"),
        ([{"instruction": "a", "output": "b", "kind": ["x", "y"]}], r"entry 0 has 'kind': \["),
        (
            [{"instruction": "a", "output": "b", "kind": ""}],
            "entry 0 has 'kind': \"\", but it must be a non-empty string",
        ),
        ([{"instruction": "a", "output": 7}], "entry 0 has no non-empty string 'output'"),
        ([{"instruction": "a", "output": f"b {EOT} c"}], "entry 0's 'output' holds the text <\\|endoftext\\|>"),
        ([{"instruction": f"a{EOT}", "output": "b"}], "entry 0's 'instruction' holds the text <\\|endoftext\\|>"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"x{EOT}"}]}],
            "entry 0 message 1's 'content' holds the text <\\|endoftext\\|>",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "answer": 3}],
            "entry 0 has 'answer': 3",
        ),
    ],
    ids=[
        "answer int",
        "kind list",
        "kind empty",
        "output int",
        "eot in output",
        "eot in instruction",
        "eot in chat",
        "chat answer int",
    ],
)
def test_every_field_is_checked_before_training(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_examples(bad, "test.json")
    if "messages" in bad[0] or "output" not in str(message):  # --answer_file: 'output' optional, checked where present
        with pytest.raises(ValueError, match=message):
            validate_examples(bad, "test.json", required=("instruction",))


def test_a_deeply_nested_file_and_a_directory_are_named(tmp_path):
    from support.instruction_files import load_answer_file

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for load in (load_examples, load_answer_file):
        with pytest.raises(ValueError, match="deep.json nests lists or objects too deeply for Python's JSON reader"):
            load(str(deep))
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"messages": []}\n' + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"too deeply .*\(line 2\)"):
        load_examples(str(lines))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    with pytest.raises(
        ValueError,
        match=f"--dataset {tmp_path / 'data'} is a directory; give a .json or .jsonl file, e.g. .*train.json",
    ):
        load_examples(str(tmp_path / "data"))
