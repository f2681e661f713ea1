"""
An English pretraining corpus that exists on every machine with Python: the docstrings of the standard library.

A fresh offline machine cannot download GPT-2 or a web corpus, but the interpreter running this file ships about
1.5 MB of carefully written English prose in its own source. We read the source files with `ast` (nothing is
imported or executed), in sorted order, so the corpus is the same on every run of the same Python version.
"""

import ast
import functools
import os
import sysconfig

from tokenizer import EOT_TEXT

# Folders left out: tests (code-heavy, huge), the IDE and GUI demos, vendored packages, and bytecode.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter", "turtledemo",
             "ensurepip", "pydoc_data", "__pycache__"}
MIN_DOCSTRING_CHARS = 40  # one-liners like "Return x." teach little


@functools.lru_cache(maxsize=1)  # parsing ~600 files takes seconds; the result never changes within a run
def stdlib_docstrings(root=None):
    """Every module, class and function docstring of at least MIN_DOCSTRING_CHARS characters, in a fixed order."""
    root = root or sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (e.g. bad-encoding test data)
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                        docs.append(doc)
    if not docs:
        raise RuntimeError(f"found no docstrings under {root}; is this a full Python installation with its .py sources?")
    return tuple(docs)


def stdlib_corpus(sources=("docstrings",), val_fraction=0.05):
    """(train_text, val_text): docstrings separated by <|endoftext|>, so the model meets the token that later ends
    every fine-tuning response. Every 1/val_fraction-th docstring is held out, so
    validation covers the whole library rather than its alphabetical tail. `sources` (train.py's --corpus, a
    comma-separated string or a tuple) names the texts to train on; this file has only "docstrings"."""
    if isinstance(sources, str):
        sources = tuple(s.strip() for s in sources.split(","))
    unknown = [s for s in sources if s != "docstrings"]
    if unknown or not sources:
        raise ValueError(f"--corpus {','.join(sources)}: this corpus.py has only the 'docstrings' source")
    docs = stdlib_docstrings()
    every = round(1 / val_fraction)
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return EOT_TEXT.join(train), EOT_TEXT.join(val)
