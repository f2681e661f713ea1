"""benchmarks/answer_batches.py is a script that prints times, not a timed test: here it only has to run end to end on
a small base and count what it answered the way train.py would."""

import math
import os
import subprocess
import sys

import pytest
from test_train import tiny_pretrain_config

import train
from benchmarks import answer_batches
from support.instructions import InstructionData, example_prompt, resolve_template
from support.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train.train(tiny_pretrain_config(out, block_size=128, max_iters=2, eval_interval=2, eval_batches=1))
    return str(out)


def test_both_ways_answer_the_test_prompts_train_py_answers_alike(base, capsys):
    figures = answer_batches.measure(base, limit=70, new_tokens=4)
    template = resolve_template("auto", "bytes")  # what train.py answers the byte-level base in
    test_examples = InstructionData("embedded", get_tokenizer("bytes"), 128, 1337, True, template).test_examples
    assert figures["prompts"] == 70 and len(test_examples) >= 70
    assert figures["batches"] == math.ceil(70 / answer_batches.BATCH) == 2
    assert 1 < figures["lengths"] <= 70  # the embedded prompts differ in length: several equal-length groups
    assert figures["padded_seconds"] > 0 and figures["grouped_seconds"] > 0 and figures["same_answers"] is True
    out = capsys.readouterr().out
    assert f"{figures['lengths']} distinct lengths" in out and "2 batches of up to 64" in out
    assert "the same 70 answers: yes" in out
    # this base's 128-byte context leaves 124 for a prompt (longer ones keep their end, as answer_examples crops them)
    lengths = [min(len(example_prompt(ex, template)[0].encode()), 124) for ex in test_examples[:70]]
    assert f"70 test prompts of {min(lengths)}-{max(lengths)} tokens," in out


def test_a_missing_base_is_one_line_and_a_non_zero_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.answer_batches", "--init_from", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --init_from {str(tmp_path / 'nothing')!r}: use 'tiny', 'scratch', "
        "one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, or an existing checkpoint path"
    ]
