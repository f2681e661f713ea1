"""support/corpus.py's 'instructions' source: the embedded set's training part, never a test example or phrasing."""
import json

from support.corpus import documents
from support.instructions import EMBEDDED_INSTRUCTIONS_PATH, format_prompt, split_examples


def test_instruction_documents_are_the_training_split_as_fine_tuning_shows_it():
    with open(EMBEDDED_INSTRUCTIONS_PATH, encoding="utf-8") as f:
        train, val, test = split_examples(json.load(f))
    docs = documents("instructions")
    assert docs == [format_prompt(ex, "compact") + ex["output"] for ex in train]
    text = "\n".join(docs)
    assert not [ex for ex in val + test if format_prompt(ex, "compact") in text]  # no validation or test prompt
    assert {ex["phrasing"] for ex in train} == {"trained"}  # so no held-out phrasing reaches pretraining
