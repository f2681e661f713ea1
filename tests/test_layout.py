"""The repository's shape: the root holds the lesson, lessons import only earlier lessons (model <- lora <- quantize),
support code stays in support/, and the lesson files stay short enough to read."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = {"model": set(), "lora": {"model"}, "quantize": {"model", "lora"}}  # what each may import at module level
PROGRAMS = ("train", "finetune_classifier")
LINE_LIMITS = {"model.py": 450, "lora.py": 260, "quantize.py": 500, "train.py": 350, "finetune_classifier.py": 460}
ROOT_PROGRAMS = {"chat.py": 170}  # the one program at the root besides the lesson: answering with a trained run


def project_modules():
    """The names an `import` of this repository can start with: its top-level modules and packages."""
    names = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    return names | {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}


def module_level_imports(path):
    """(line, top-level name) of each import that runs when the file is imported: not those inside a function."""
    found = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return  # runs only when called
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
        for child in ast.iter_child_nodes(node):  # class bodies, if / try / with blocks run at import too
            visit(child)

    visit(ast.parse(open(path, encoding="utf-8").read()))
    return found


def violations(path, allowed):
    project = project_modules()
    return [
        f"{os.path.basename(path)}:{line} imports {name}"
        for line, name in module_level_imports(path)
        if name in project and name not in allowed
    ]


@pytest.mark.parametrize("lesson", LESSONS)
def test_lessons_import_only_earlier_lessons(lesson):
    assert violations(os.path.join(ROOT, f"{lesson}.py"), LESSONS[lesson]) == []


def test_the_import_check_sees_a_violation(tmp_path):
    """A mutant model.py that imports support at module level (and another that imports quantize) is caught; the
    same import inside a function is allowed (a lesson may reach support code for an optional path)."""
    bad = tmp_path / "model.py"
    bad.write_text(
        "import torch\nfrom support.files import download_file\nimport quantize\n\n\ndef f():\n    import support\n"
    )
    assert violations(str(bad), LESSONS["model"]) == ["model.py:2 imports support", "model.py:3 imports quantize"]


def test_importing_a_lesson_loads_no_other_project_module():
    """What a learner gets from `import model` (then lora, then quantize): that file and the lessons before it."""
    import subprocess

    for lesson, allowed in LESSONS.items():
        code = (
            f"import sys; sys.path.insert(0, {ROOT!r}); import {lesson}; "
            f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(project_modules())!r})))"
        )
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        assert lesson in loaded and set(loaded) <= {lesson} | allowed, (lesson, loaded)


def test_the_root_holds_the_lesson_files_and_one_folder_of_each_kind():
    assert sorted(name for name in os.listdir(ROOT) if name.endswith(".py")) == sorted({**LINE_LIMITS, **ROOT_PROGRAMS})
    packages = {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}
    assert {"support", "other_methods"} <= packages
    for name in ("peft", "transformers", "bitsandbytes"):  # the tests import those libraries
        assert not os.path.exists(os.path.join(ROOT, name)) and not os.path.exists(os.path.join(ROOT, name + ".py"))


@pytest.mark.parametrize("name", {**LINE_LIMITS, **ROOT_PROGRAMS})
def test_lesson_files_are_short_and_narrow(name):
    lines = open(os.path.join(ROOT, name), encoding="utf-8").read().splitlines()
    assert len(lines) <= {**LINE_LIMITS, **ROOT_PROGRAMS}[name]
    wide = [number for number, line in enumerate(lines, 1) if len(line) > 120]
    assert wide == [], f"{name}: lines wider than 120 columns: {wide}"


def test_train_py_reaches_its_loop_early():
    """nanoGPT's train.py is flat and in run order; ours puts the loop before line 200 (configuration, model, data
    come first)."""
    lines = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read().splitlines()
    loop = next(number for number, line in enumerate(lines, 1) if line.strip().startswith("for step in steps"))
    assert loop < 200


def test_the_lessons_know_nothing_of_what_comes_after_them():
    """model.py names no optional lesson (prefix tuning and LLaMA-Adapter wrap its layers instead of filling slots in
    it), and quantize.py's definition reads no environment variable (the fast paths are the programs' opt-in)."""
    model_source = open(os.path.join(ROOT, "model.py"), encoding="utf-8").read()
    methods = [name[:-3] for name in os.listdir(os.path.join(ROOT, "other_methods")) if name.endswith(".py")]
    for word in [
        "other_methods",
        "adaption_prompt",
        "self.prefix",
        *[m for m in methods if m in ("ia3", "intrinsic") or "_" in m.strip("_")],
    ]:
        assert word not in model_source, word
    assert "os.environ" not in open(os.path.join(ROOT, "quantize.py"), encoding="utf-8").read()


def test_support_modules_are_short():
    """support/ is split by topic, and no module grows past what one sitting reads (issue 37: 300 lines)."""
    sizes = {
        name: len(open(os.path.join(ROOT, "support", name), encoding="utf-8").read().splitlines())
        for name in os.listdir(os.path.join(ROOT, "support"))
        if name.endswith(".py")
    }
    assert max(sizes.values()) <= 300, sorted(sizes.items(), key=lambda item: -item[1])[:3]
