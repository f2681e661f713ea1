"""benchmarks/gpu_check.py runs end to end with --device cpu (its steps made small), so the GPU check cannot rot
between the rare runs on a GPU: every step runs or says why not, the results file holds what the table prints."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_step_runs_or_says_why_not(cpu_run):
    results, printed = cpu_run
    steps = results["steps"]
    assert list(steps) == list(gpu_check.STEPS) and results["device"] == "cpu"
    assert {name: step["status"] for name, step in steps.items()} == dict(
        suite="ok", default="ok", compile="ok", memory="ok", ddp="skipped"
    )
    assert steps["ddp"]["reason"].startswith("--device cpu: NCCL needs GPUs")
    # the suite's CUDA part exists: every test that takes the device fixture has a CUDA item (collected, skipped here)
    assert steps["suite"]["cuda_items"] >= 40
    default = steps["default"]
    assert default["autocast"].startswith("none") and default["max_iters"] == 4
    assert default["val_loss_after"] < default["val_loss_before"]  # 4 LoRA steps on a random base: the loss moves down
    compile_ = steps["compile"]
    assert compile_["backend"] == "aot_eager" and compile_["max_relative_loss_difference"] <= compile_["tolerance"]
    recipe = steps["memory"]["recipes"][0]
    assert (
        recipe["computed_weights_and_state_bytes"] > recipe["computed_weights_bytes"] > 0
        and recipe["lora_params"] == 2 * 2 * 2 * 8 * 64
    )
    for name in gpu_check.STEPS:  # the table shows every step with its status
        assert any(line.startswith(name) and steps[name]["status"] in line for line in printed.splitlines()), name


def test_flags_are_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "suite,bench"])
    args = gpu_check.parse_args(["--device", "cpu", "--only", "memory,ddp"])
    assert args.steps == ["memory", "ddp"] and args.out.endswith(os.path.join("benchmarks", "gpu_check_cpu.json"))
