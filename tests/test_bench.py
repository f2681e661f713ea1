"""benchmarks/bench.py is a script, not a timed test: here it only has to run end to end on the tiny shape and write every row."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench",
        "--shape",
        "tiny",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--memory",
        "reset",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        results = json.load(f)
    with open(out.with_suffix(".md")) as f:
        markdown = f.read()
    return results, markdown


def test_json_has_every_row_with_both_measurements(report):
    results, _ = report
    assert list(results["rows"]) == bench.ALL_ROWS
    for row, entry in results["rows"].items():
        if row.startswith("peak_"):  # --memory reset on a model this small may find no growth at all (see below)
            assert (
                entry["unit"] == "MiB"
                and entry["method"] == "reset"
                and all(math.isfinite(entry[s]) for s in ("ours", "hf"))
            )
            continue
        for side in ("ours", "hf"):
            assert math.isfinite(entry[side]) and entry[side] > 0, (row, side, entry[side])
        assert entry["ratio"] == pytest.approx(entry["ours"] / entry["hf"])
    # like with like: the same trainable parameters where the adapters are the same size
    rows = results["rows"]
    assert rows["params_full"]["ours"] == rows["params_full"]["hf"]
    assert rows["params_lora_qv"]["ours"] == rows["params_lora_qv"]["hf"]  # 2 x (r x d + d x r) == r x d + 3d x r
    assert rows["params_lora_qkv"]["ours"] == 1.5 * rows["params_lora_qkv"]["hf"]
    assert rows["infer_base"]["max_logit_difference"] < 1e-3  # both libraries computed the same function
    assert rows["nf4_quantize"]["identical_codes"]
    # the definition and the opt-in paths compute the same values, so they differ from bitsandbytes alike
    for row in ("nf4_dequantize_table", "nf4_dequantize_kernel"):
        assert rows[row]["max_difference"] == rows["nf4_dequantize"]["max_difference"], row
    assert (rows["nf4_dequantize"]["path"], rows["nf4_dequantize_table"]["path"]) == ("reference", "table")
    assert rows["nf4_dequantize_kernel"]["path"].startswith("C kernel")


def test_markdown_table_names_machine_command_and_every_row(report):
    results, markdown = report
    assert results["machine"]["cpu"] in markdown and "torch " + results["machine"]["torch"] in markdown
    assert results["command"] in markdown and "--shape tiny" in results["command"]
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| row | ours | HF | ours/HF | better |"
    assert table[1].startswith("| --- |")
    labels = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert labels == [f"{e['label']} ({e['unit']})" for e in results["rows"].values()]
    assert all(line.count("|") == 6 for line in table)  # no label breaks the table with a stray "|"
    assert f"(kernel: {results['rows']['nf4_dequantize_kernel']['path']})." in markdown


def test_unknown_row_or_bad_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "train,no_such_row"])
    assert "no_such_row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
    args = bench.parse_args(["--quick", "--only", "nf4,train_full"])
    assert (args.shape, args.repeats, args.memory) == ("small", 2, "reset")
    assert args.wanted == {
        "nf4_quantize",
        "nf4_dequantize",
        "nf4_dequantize_table",
        "nf4_dequantize_kernel",
        "train_full",
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the CPU peak needs Linux's /proc")
def test_cpu_peak_memory_sees_a_known_allocation_and_forgets_it_after_a_reset():
    """What the peak rows measure on the CPU (bench.measure_peak): the resident-set peak after reset_peak_memory, above
    the memory in use before. A 64 MiB tensor created after the reset shows up; after it is freed and the
    counter reset, the next peak no longer holds it (a peak that was never reset, or the current size read instead of
    the peak, fails one of the two)."""
    import torch

    from support.runs import peak_memory_bytes, reset_peak_memory

    bench.return_freed_memory("cpu")
    baseline = bench.current_memory_bytes("cpu")
    reset_peak_memory("cpu")
    big = torch.ones(16 * 2**20)  # 64 MiB, written, so every page is resident
    del big
    bench.return_freed_memory("cpu")
    grown = peak_memory_bytes("cpu") - baseline
    assert 48 * 2**20 <= grown < 96 * 2**20  # (what the process freed meanwhile may take a little off)
    assert bench.current_memory_bytes("cpu") - baseline < 16 * 2**20  # freed: the current size is back down
    reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") - baseline < 16 * 2**20
