"""Every notebook runs top to bottom on small settings (NANOQLORA_SMALL=1), so none of them can rot, and every claim
it prints as True or False (`merged W0 + scaling·BA computes the same: True`) comes out as in its committed outputs."""

import glob
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("NANOQLORA_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "OMP_NUM_THREADS", "1"
    )  # the kernel is one more process on a small CI machine: don't oversubscribe it
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    committed, executed = printed_claims(nbformat.read(path, as_version=4)), printed_claims(notebook)
    shared = [key for key in committed if key in executed]
    missing = [key for key in committed if key not in executed]
    assert len(shared) >= 0.8 * len(committed), (
        f"only {len(shared)} of the {len(committed)} printed claims came out: {missing}"
    )
    for key in shared:  # (how often a line is printed may depend on the size: compare which booleans it printed)
        assert set(executed[key]) == set(committed[key]), (
            f"{key!r} printed {executed[key]}, the committed notebook {committed[key]}"
        )


# a claim is a boolean printed after ": ", " = ", "? " or another claim; `bias=True` in a printed config is a setting
CLAIM = re.compile(r"(?:(?<=: )|(?<= = )|(?<=\? )|(?<=True )|(?<=False ))(True|False)\b")


def printed_claims(notebook):
    """{line with its numbers and booleans blanked: the booleans it printed, per occurrence} over a notebook's outputs.
    The claims a notebook prints ("reloaded adapter gives identical logits: True") hold at any size, so the small run
    of the test must print the same booleans as the full run whose outputs are committed; numbers may differ."""
    claims = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            for line in text.splitlines():
                line = " ".join(line.split()).replace(" :", ":")  # spacing ignored
                values = CLAIM.findall(line)
                if values:  # the line up to its last claim (what follows may be a generated answer)
                    claim = line[: line.rfind(values[-1])]
                    key = CLAIM.sub("<bool>", re.sub(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?", "#", claim))
                    claims.setdefault(key, []).append(tuple(values))
    return claims


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold the course notebooks"
