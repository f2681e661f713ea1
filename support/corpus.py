"""An English pretraining corpus that exists on every machine with Python: the standard library's own text, read
as data (nothing imported or run) in sorted order, so it is the same on every run of one Python version. Sources:
"docstrings" (prose), "comments" (each file's, one document per file), "topics" (the reference pages `help("if")`
prints), "code" (the sources without docstrings: it teaches copying from context), and "instructions" (the embedded
set's training split, in the compact template). Validation is always every VAL_EVERY-th docstring, held out of
every mix, so losses of bases trained on different mixes compare."""

import ast
import functools
import io
import os
import sysconfig
import tokenize

import torch

from support.tokenizer import EOT_TEXT

# left out: tests (code-heavy, huge), the IDE and GUI demos, vendored packages, bytecode
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter", "turtledemo"}
SKIP_DIRS |= {"ensurepip", "pydoc_data", "__pycache__"}
MIN_DOCSTRING_CHARS = 40  # one-liners like "Return x." teach little
SOURCES = ("docstrings", "comments", "topics", "code", "instructions")
VAL_EVERY = 20  # every 20th docstring is held out for validation
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # what can have a docstring


@functools.lru_cache(maxsize=1)  # reading ~560 files takes seconds; the result never changes within a run
def stdlib_sources(root=None):
    """(path, source text) of every readable .py file of the standard library, in a fixed order."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                    files.append((os.path.join(dirpath, filename), f.read()))
            except (UnicodeDecodeError, OSError):
                continue
    if not files:
        raise RuntimeError(f"found no .py files under {root}; is this a full Python installation with its sources?")
    return tuple(files)


@functools.lru_cache(maxsize=1)
def stdlib_docstrings(root=None):
    """Every module, class and function docstring of at least MIN_DOCSTRING_CHARS characters, in a fixed order."""
    docs = []
    for _, source in stdlib_sources(root):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (e.g. bad-encoding test data)
        for node in ast.walk(tree):
            if isinstance(node, DOCUMENTED):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return tuple(docs)


def stdlib_comments(root=None):
    """Each file's comments (without the '#'), one document per file, lines in file order."""
    docs = []
    for _, source in stdlib_sources(root):
        lines = []
        try:
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                if token.type == tokenize.COMMENT and not token.string.startswith("#!"):
                    text = token.string.lstrip("#").strip()
                    if len(text) > 3:
                        lines.append(text)
        except (tokenize.TokenError, SyntaxError):
            continue
        if lines:
            docs.append("\n".join(lines))
    return docs


def code_without_docstrings(source):
    """A source file without its docstrings, so that held-out docstrings never reach training as code."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source
    lines, cut = source.splitlines(keepends=True), set()
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            first = node.body[0]
            cut.update(range(first.lineno - 1, first.end_lineno))
    return "".join(line for i, line in enumerate(lines) if i not in cut)


def reference_topics():
    """The language reference pages of pydoc_data/topics.py, read as data with ast (not imported)."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            return [text for _, text in sorted(ast.literal_eval(node.value).items())]
    return []


def instruction_documents():
    """The embedded set's training split (no test item, no held-out phrasing) as prompt and response."""
    from support.instruction_files import EMBEDDED_INSTRUCTIONS_PATH, read_json_list, split_examples
    from support.instructions import format_prompt

    train = split_examples(read_json_list(EMBEDDED_INSTRUCTIONS_PATH))[0]
    return [format_prompt(ex, "compact") + ex["output"] for ex in train]


def documents(source):
    if source == "docstrings":
        docs = stdlib_docstrings()
        return [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    if source == "comments":
        return stdlib_comments()
    if source == "topics":
        return reference_topics()
    if source == "code":
        return [code_without_docstrings(text) for _, text in stdlib_sources()]
    if source == "instructions":
        return instruction_documents()
    raise ValueError(f"unknown corpus source {source!r}: use any of {', '.join(SOURCES)}, comma-separated")


def stdlib_corpus(sources=("docstrings",)):
    """(train_text, val_text), documents separated by <|endoftext|> (the token that later ends every response)."""
    if isinstance(sources, str):
        sources = tuple(s.strip() for s in sources.split(","))
    docs = stdlib_docstrings()
    if not docs:
        raise RuntimeError("found no docstrings in the standard library; is this a full Python installation?")
    train = [d for source in sources for d in documents(source)]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return EOT_TEXT.join(train), EOT_TEXT.join(val)


class PretrainingData:
    """The corpus as one token stream; a batch is random windows drawn by (seed, step) alone, so a resumed run
    sees the batches the uninterrupted run would have."""

    def __init__(self, tokenizer, block_size, seed, sources="docstrings"):
        train_text, val_text = stdlib_corpus(sources)
        self.train = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
        self.val = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
        self.block_size, self.seed = block_size, seed
        n = (len(self.val) - 1) // block_size  # validation: every non-overlapping window, the same each time
        self.val_windows = self.val[: n * block_size + 1]

    def train_batch(self, step, micro, batch_size):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        starts = torch.randint(len(self.train) - self.block_size - 1, (batch_size,), generator=g)
        x = torch.stack([self.train[s : s + self.block_size] for s in starts])
        y = torch.stack([self.train[s + 1 : s + 1 + self.block_size] for s in starts])
        return x, y

    def val_batches(self, batch_size):
        n = (len(self.val_windows) - 1) // self.block_size
        x = self.val_windows[:-1].view(n, self.block_size)
        y = self.val_windows[1:].view(n, self.block_size)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]

    def describe(self):
        return f"stdlib corpus: {len(self.train):,} train and {len(self.val):,} validation bytes"
