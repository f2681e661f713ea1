"""support/answers.py: answers batched across prompt lengths are the answers one at a time, for a plain model and
for one whose prefix (prefix tuning) fills the KV cache ahead of every row, where no left padding can go."""

import pytest
import torch

from model import GPT, GPTConfig
from other_methods.prefix_tuning import apply_prefix_tuning
from support.answers import answer, answer_examples
from support.tokenizer import ByteTokenizer

EXAMPLES = [
    {"instruction": "Hi.", "input": ""},
    {"instruction": "Name a colour of the sea.", "input": "sea"},
    {"instruction": "Two", "input": ""},
    {"instruction": "A longer instruction than the others here.", "input": ""},
]


@pytest.mark.parametrize("prefix", [False, True], ids=["plain", "prefix tuning"])
def test_batched_answers_equal_one_at_a_time(prefix):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=257, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    if prefix:
        apply_prefix_tuning(model, num_virtual_tokens=4)
    with torch.no_grad():  # weights far from the init (and a prefix unlike any real token's): answers that differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tokenizer = ByteTokenizer()
    batched = answer_examples(model, tokenizer, EXAMPLES, "cpu", max_new_tokens=12, template="bare")
    alone = [answer(model, tokenizer, ex["instruction"], "cpu", 12, ex["input"], template="bare") for ex in EXAMPLES]
    assert batched == alone and len(set(alone)) > 1
