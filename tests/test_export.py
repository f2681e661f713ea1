"""support/export.py (python -m support.export): a run in Hugging Face's formats, PEFT's adapter and transformers'
GPT-2, whose logits are ours; an export never writes into the run or its base, goes only into a new, empty or earlier
export folder under that folder's run lock, and a failed export leaves the earlier one whole."""

import json
import os

import pytest
import test_train
from test_train import run_main

from support import checkpoints, export
from support.files import UserError
from support.runs import lock_out_dir

plain_run, small_base = test_train.plain_run, test_train.small_base  # test_train.py's fixtures: a run on a plain base


def test_export_peft_and_hf_from_the_command_line(plain_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    _, run = plain_run
    export.export_run(
        export.parse_args(["--adapter", str(run), "--peft", str(tmp_path / "peft"), "--hf", str(tmp_path / "hf")])
    )
    ours, _ = checkpoints.load_finetuned(str(run), "tiny", "cpu")
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)[0]
        base = GPT2LMHeadModel.from_pretrained(
            tmp_path / "peft" / "base"
        )  # the tiny base is not an HF model: written beside the adapter
        base_logits = base.eval()(idx).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(idx).logits
        merged_logits = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(idx).logits
    assert (expected - base_logits).abs().max().item() > 1e-3  # the adapter matters, so the comparisons below do
    assert (expected - peft_logits).abs().max().item() <= 1e-4
    assert (expected - merged_logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="--peft needs --adapter"):
        export.export_run(export.parse_args(["--peft", str(tmp_path / "x")]))
    # the run's metadata travel in the safetensors header (PEFT reads only adapter_config.json's LoraConfig keys)
    from safetensors import safe_open

    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        header = json.loads(f.metadata()["nanoqlora"])
    adapter_metadata = json.load(open(run / "adapter_config.json"))["metadata"]
    assert header == adapter_metadata and header["prompt_template"] == "bare" and header["finetune"] == "lora"
    assert "metadata" not in json.load(open(tmp_path / "peft" / "adapter_config.json"))
    with pytest.raises(UserError, match="is a PEFT adapter, .*peft_format.import_peft"):  # not loadable as one of ours
        checkpoints.load_finetuned(str(tmp_path / "peft"), "tiny", "cpu")


def test_a_base_with_smeared_keys_is_not_exported_to_hf(small_base, tmp_path):
    with pytest.raises(UserError, match="smeared keys.*--no-smear_keys"):
        export.export_run(export.parse_args(["--init_from", small_base, "--hf", str(tmp_path / "hf")]))
    assert not (tmp_path / "hf").exists()


def test_an_export_never_writes_into_the_run_or_its_base(plain_run, tmp_path):
    base, run = plain_run
    kept = {p.name: p.read_bytes() for p in run.iterdir()}
    for flags, what in (
        (["--adapter", str(run), "--peft", str(run)], "the --adapter run's own folder"),
        (["--adapter", str(run), "--hf", str(run)], "the --adapter run's own folder"),
        (["--init_from", str(base), "--adapter", str(run), "--hf", str(base)], "the folder of the base"),
    ):
        with pytest.raises(UserError, match=f"is {what}.*: an export never writes into it"):
            export.export_run(export.parse_args(flags))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == kept
    # the base as an HF folder (the same weights, so the same fingerprint): --export_hf of base + adapter into that
    # folder would rewrite the base with the adapter merged in, and the next load would apply the update twice
    hf = tmp_path / "hf-base"
    export.export_run(export.parse_args(["--init_from", str(base), "--hf", str(hf)]))
    weights = (hf / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="is the folder of the base"):
        export.export_run(export.parse_args(["--init_from", str(hf), "--adapter", str(run), "--hf", str(hf)]))
    assert (hf / "model.safetensors").read_bytes() == weights


def test_an_export_goes_only_into_a_new_empty_or_earlier_export_folder_and_takes_the_lock(plain_run, tmp_path):
    base, run = plain_run
    export_to = lambda *flags: export.export_run(export.parse_args(["--adapter", str(run), *flags]))
    with lock_out_dir(str(tmp_path / "busy")):  # a run training there
        with pytest.raises(UserError, match="busy is in use by another run or export"):
            export_to("--hf", str(tmp_path / "busy"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="notes holds todo.txt, which is not an earlier export of this kind"):
        export_to("--peft", str(notes))
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    hf = tmp_path / "hf"
    export_to("--hf", str(hf))
    with pytest.raises(
        UserError, match="hf holds config.json, model.safetensors, which is not an earlier export of this kind"
    ):
        export_to("--peft", str(hf))  # an HF export is not a PEFT export
    merged = (hf / "model.safetensors").read_bytes()
    export.export_run(export.parse_args(["--init_from", str(base), "--hf", str(hf)]))  # the base alone, over it
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    assert (hf / "model.safetensors").read_bytes() != merged
    assert sorted(os.listdir(tmp_path)) == ["busy", "hf", "notes"]  # no working folder left beside them


def test_an_export_that_fails_half_way_leaves_the_earlier_export_whole(plain_run, tmp_path, monkeypatch):
    from support import peft_format

    base, run = plain_run
    target = tmp_path / "peft"
    export.export_run(export.parse_args(["--adapter", str(run), "--peft", str(target)]))
    files = {p.relative_to(target): (p.read_bytes(), p.stat().st_ino) for p in target.rglob("*") if p.is_file()}
    real_save = peft_format.save_safetensors_atomic

    def die_after_the_base(tensors, path, metadata=None):
        if os.path.basename(path) == "adapter_model.safetensors":
            raise KeyboardInterrupt  # killed after the base and the adapter's config were written
        real_save(tensors, path, metadata)

    monkeypatch.setattr(peft_format, "save_safetensors_atomic", die_after_the_base)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(export.parse_args(["--adapter", str(run), "--peft", str(target)]))
    # the same files, not even rewritten with the same bytes (a new inode would be): the new export went elsewhere
    assert {p.relative_to(target): (p.read_bytes(), p.stat().st_ino) for p in target.rglob("*") if p.is_file()} == files
    assert os.listdir(tmp_path) == ["peft"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hf", "out/hf", "--peft", "out/peft"], "--peft needs --adapter"),
        (["--adapter", "out/somewhere"], "nothing to export: give --peft DIR"),
    ],
)
def test_bad_export_flags_are_one_line_errors(flags, message, monkeypatch):
    exit_message = run_main("support/export.py", "--init_from", "/nonexistent/base", *flags, monkeypatch=monkeypatch)
    assert exit_message.startswith("error: ") and "\n" not in exit_message and message in exit_message
