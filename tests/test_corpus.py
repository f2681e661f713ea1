"""support/corpus.py: the pretraining text read from a standard library (here a small stand-in written by the test),
the held-out validation docstrings that no training source contains (not even as code), the batches of a run, and the
'instructions' source: the embedded set's training part, never a test example or phrasing."""

import json
import os

import pytest
import torch

from support import corpus
from support.instruction_files import EMBEDDED_INSTRUCTIONS_PATH, split_examples
from support.instructions import format_prompt
from support.tokenizer import EOT_TEXT, get_tokenizer


def docstring(i):
    return f"Function number {i} of the stand-in library computes something worth a sentence."


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A stand-in standard library: two modules of documented functions and comments, a test folder and a file with a
    syntax error (both left out), and a file that is not UTF-8 (skipped). The corpus functions read it instead of the
    real one; the real one's cache is left alone."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    functions = lambda numbers: "".join(
        f'def f{i}(x):\n    """{docstring(i)}"""\n    # comment {i} on the body\n    return x + {i}\n\n'
        for i in numbers
    )
    (root / "alpha.py").write_text(
        '"""The alpha module: the first half of the stand-in library\'s functions."""\n' + functions(range(0, 20))
    )
    (root / "pkg" / "beta.py").write_text(functions(range(20, 41)) + 'class C:\n    """Short."""\n')
    (root / "test" / "test_gamma.py").write_text(functions(range(100, 105)))  # tests: skipped
    (root / "broken.py").write_text(
        '"""A module docstring that cannot be read: the file has a syntax error."""\ndef (:\n'
    )
    (root / "latin.py").write_bytes(
        '"""Caf\xe9 au lait, a docstring in Latin-1, not UTF-8 at all."""\n'.encode("latin-1")
    )
    sources = corpus.stdlib_sources.__wrapped__(str(root))
    monkeypatch.setattr(corpus, "stdlib_sources", lambda root=None: sources)
    read_docstrings = corpus.stdlib_docstrings.__wrapped__  # uncached: it calls the stand-in stdlib_sources
    monkeypatch.setattr(corpus, "stdlib_docstrings", lambda root=None: read_docstrings(root))
    return root


def test_sources_are_read_in_a_fixed_order_without_tests_or_unreadable_files(fake_stdlib):
    paths = [os.path.relpath(path, fake_stdlib) for path, _ in corpus.stdlib_sources()]
    assert paths == ["alpha.py", "broken.py", os.path.join("pkg", "beta.py")]  # sorted; test/ and latin.py left out


def test_docstrings_comments_and_code(fake_stdlib):
    docs = corpus.stdlib_docstrings()
    module_doc = "The alpha module: the first half of the stand-in library's functions."
    assert docs == (
        module_doc,
        *[docstring(i) for i in range(41)],
    )  # "Short." is under 40 characters; broken.py unparsed
    comments = corpus.stdlib_comments()
    assert len(comments) == 2 and comments[0].splitlines()[:2] == ["comment 0 on the body", "comment 1 on the body"]
    source = dict(corpus.stdlib_sources())[str(fake_stdlib / "alpha.py")]
    code = corpus.code_without_docstrings(source)
    assert "def f7(x):\n    # comment 7 on the body\n    return x + 7" in code
    assert docstring(7) not in code and module_doc not in code
    assert corpus.code_without_docstrings("def (:\n") == "def (:\n"  # unparsable: kept as it is


def test_validation_is_every_20th_docstring_and_no_training_source_holds_it(fake_stdlib):
    train, val = corpus.stdlib_corpus("docstrings,comments,code")
    held_out = [docstring(i) for i in (18, 38)]  # positions 19 and 39 of the docstrings (the module's comes first)
    assert val.split(EOT_TEXT) == held_out
    for text in held_out:
        assert text not in train  # not as a docstring, and not inside the code either
    assert docstring(17) in train and "return x + 18" in train and "comment 18 on the body" in train
    assert train.count(EOT_TEXT) == (42 - 2) + 2 + 3 - 1  # documents: docstrings, 2 files of comments, 3 of code
    assert corpus.stdlib_corpus("code")[1] == val  # the same validation text whatever trains
    with pytest.raises(ValueError, match="unknown corpus source 'poems'"):
        corpus.stdlib_corpus("docstrings,poems")


def test_batches_depend_only_on_seed_step_and_micro_batch(fake_stdlib):
    data = corpus.PretrainingData(get_tokenizer("bytes"), block_size=16, seed=3, sources="docstrings")
    x, y = data.train_batch(step=5, micro=1, batch_size=4)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte
    again = corpus.PretrainingData(get_tokenizer("bytes"), block_size=16, seed=3, sources="docstrings")
    assert all(torch.equal(a, b) for a, b in zip(again.train_batch(5, 1, 4), (x, y)))  # a resumed run sees the same
    assert not torch.equal(data.train_batch(6, 1, 4)[0], x) and not torch.equal(data.train_batch(5, 0, 4)[0], x)
    val = data.val_batches(batch_size=3)
    windows = torch.cat([vx for vx, _ in val])
    assert windows.shape[1] == 16 and torch.equal(
        windows.flatten(), data.val[: windows.numel()]
    )  # every window, in order
    assert torch.equal(torch.cat([vy for _, vy in val]).flatten(), data.val[1 : windows.numel() + 1])


def test_instruction_documents_are_the_training_split_as_fine_tuning_shows_it():
    with open(EMBEDDED_INSTRUCTIONS_PATH, encoding="utf-8") as f:
        train, val, test = split_examples(json.load(f))
    docs = corpus.documents("instructions")
    assert docs == [format_prompt(ex, "compact") + ex["output"] for ex in train]
    text = "\n".join(docs)
    assert not [ex for ex in val + test if format_prompt(ex, "compact") in text]  # no validation or test prompt
    assert {ex["phrasing"] for ex in train} == {"trained"}  # so no held-out phrasing reaches pretraining
