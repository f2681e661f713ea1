"""chat.py: base and adapter loaded once, every piped line answered, the base's answer (adapter off) beside the tuned
model's (adapter on), each the answer the model gives when loaded on its own; bad inputs are one-line errors."""

import io
import os
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import WritesMarker

import chat
import lora
import train
from support import checkpoints
from support.adapters import save_adapter
from support.answers import answer
from support.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = "Name a color.\n\n   \nGive an antonym of 'hot'.\nSay hi.\n"  # three instructions, two blank lines
TOKENS = 12


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A small byte-level base (a few pretraining steps) and a LoRA adapter on it whose B is far from zero, so that
    the tuned model's answers differ from the base's, saved as train.py saves one (metadata naming its base)."""
    root = tmp_path_factory.mktemp("chat")
    base_dir = str(root / "base")
    train.train(
        train.resolve_defaults(
            train.TrainConfig(
                init_from="scratch",
                dataset="stdlib",
                out_dir=base_dir,
                n_layer=2,
                n_head=2,
                n_embd=32,
                block_size=128,
                batch_size=4,
                max_iters=3,
                eval_interval=3,
                eval_batches=1,
                progress=False,
                device="cpu",
            )
        )
    )
    model, tokenizer_name = checkpoints.load_checkpoint_model(base_dir)
    base_sha256 = checkpoints.weights_sha256(model)
    torch.manual_seed(0)
    lora.apply_lora(model, rank=4, alpha=8, targets="all-linear")
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    adapter_dir = str(root / "adapter")
    save_adapter(
        model,
        adapter_dir,
        metadata={
            "run_id": "test",
            "init_from": base_dir,
            "finetune": "lora",
            "step": 0,
            "prompt_template": "compact",
            "tokenizer": tokenizer_name,
            "base_sha256": base_sha256,
        },
    )
    return base_dir, adapter_dir


def talk(monkeypatch, lines=LINES, **settings):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return chat.chat(chat.ChatConfig(max_new_tokens=TOKENS, device="cpu", **settings), interactive=False)


def alone(model, instruction):
    return answer(model, get_tokenizer("bytes"), instruction, "cpu", TOKENS, template="compact")


def test_each_line_is_answered_by_the_base_and_by_the_tuned_model(base_and_adapter, monkeypatch, capsys):
    base_dir, adapter_dir = base_and_adapter
    transcript = talk(monkeypatch, adapter=adapter_dir)
    assert [instruction for instruction, _, _ in transcript] == [
        "Name a color.",
        "Give an antonym of 'hot'.",
        "Say hi.",
    ]
    fresh_base, _ = checkpoints.load_checkpoint_model(base_dir)
    tuned, _ = checkpoints.load_finetuned(adapter_dir, "tiny", "cpu")  # 'tiny': the base the adapter names
    for instruction, base_answer, tuned_answer in transcript:
        assert base_answer == alone(fresh_base, instruction)  # the adapter really was off
        assert tuned_answer == alone(tuned, instruction)  # and on again: train.py --prompt's answer
    assert any(b != t for _, b, t in transcript)  # the two columns are two models
    out = capsys.readouterr().out
    assert out.count("\n> ") + out.startswith("> ") == 3 and out.count("  base : ") == 3 and out.count("  tuned: ") == 3


def test_without_an_adapter_the_base_answers_alone(base_and_adapter, monkeypatch, capsys):
    base_dir, _ = base_and_adapter
    transcript = talk(monkeypatch, adapter="none", init_from=base_dir)
    fresh_base, _ = checkpoints.load_checkpoint_model(base_dir)
    assert [(b, t) for _, b, t in transcript] == [(alone(fresh_base, i), None) for i, _, _ in transcript]
    assert "tuned:" not in capsys.readouterr().out
    assert talk(monkeypatch, adapter=base_and_adapter[1], base=False)[0][1] is None  # --no-base: the tuned model only


def test_piped_input_through_the_program(base_and_adapter):
    _, adapter_dir = base_and_adapter
    done = subprocess.run(
        [sys.executable, "chat.py", "--adapter", adapter_dir, "--max_new_tokens", "8", "--device", "cpu"],
        cwd=ROOT,
        input=LINES,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("base: ") and f"tuned: {adapter_dir} (lora, step 0)" in lines[0]
    prompts = [line for line in lines if line.startswith("> ")]
    assert prompts == ["> Name a color.", "> Give an antonym of 'hot'.", "> Say hi."]


def test_bad_inputs_are_one_line_errors(base_and_adapter, tmp_path, monkeypatch):
    base_dir, adapter_dir = base_and_adapter
    marker = tmp_path / "code-ran"
    trapped = tmp_path / "trapped"
    trapped.mkdir()
    torch.save(
        {"model_config": {}, "tokenizer": "bytes", "model": {}, "trap": WritesMarker(marker)}, trapped / "ckpt.pt"
    )
    cases = {  # flags -> what the one line says
        ("--adapter", str(tmp_path / "nowhere")): "no LoRA adapter there (adapter_config.json missing); train one",
        ("--adapter", base_dir): f"a full-weight run: --init_from {base_dir} --adapter none",
        ("--adapter", "none", "--init_from", str(trapped)): "more than tensors and plain containers",
        ("--adapter", adapter_dir, "--max_new_tokens", "128"): "--max_new_tokens 128: the model sees 128 tokens",
        ("--adapter", adapter_dir, "--device", "tpu"): "--device 'tpu': use auto, cuda",
        ("--prompt", ""): "--prompt is empty",
        (
            "--prompt",
            "caf\udce9?",
        ): "--prompt is not valid UTF-8 (byte 0xe9 at position 3): set your terminal or shell to UTF-8",
        (
            "--prompt",
            "Say <|endoftext|> twice.",
        ): "--prompt holds the text <|endoftext|>, which the tokenizer reads as the end-of-text",
        ("--prompt", "Hi", "--answer_file", "in.json"): "--prompt and --answer_file both ask for answers",
        ("--answers_out", "out.json"): "--answers_out out.json is where --answer_file writes its answers",
        (
            "--adapter",
            adapter_dir,
            "--prompt",
            "Hi",
            "--max_new_tokens",
            "128",
        ): "--max_new_tokens 128: the model sees 128 tokens",
    }
    for (
        flags,
        message,
    ) in cases.items():  # run as `python chat.py FLAGS < "Hi."`, in this process (no second torch import)
        monkeypatch.setattr(sys, "argv", ["chat.py", *flags])
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hi.\n"))
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(os.path.join(ROOT, "chat.py"), run_name="__main__")
        line = exited.value.code  # sys.exit("error: ..."): printed as one line, exit status 1
        assert isinstance(line, str) and line.startswith("error: ") and message in line and "\n" not in line, (
            flags,
            line,
        )
    assert not marker.exists()


def test_a_prompt_or_a_file_is_answered_by_the_tuned_model_and_the_program_exits(
    base_and_adapter, tmp_path, monkeypatch, capsys
):
    """--prompt prints the tuned model's answer alone (no conversation is read from stdin); --answer_file writes every
    example back with its response (tests/test_train.py checks the scores against a run's own answers)."""
    _, adapter_dir = base_and_adapter
    monkeypatch.setattr(sys, "stdin", io.StringIO("never read\n"))
    tuned, _ = checkpoints.load_finetuned(adapter_dir, "tiny", "cpu")
    chat.main(chat.ChatConfig(adapter=adapter_dir, prompt="Name a color.", max_new_tokens=TOKENS, device="cpu"))
    assert capsys.readouterr().out.strip() == alone(tuned, "Name a color.").strip()
    (tmp_path / "in.json").write_text('[{"instruction": "Say hi."}, {"instruction": "Name a color.", "note": 1}]')
    chat.main(
        chat.ChatConfig(adapter=adapter_dir, answer_file=str(tmp_path / "in.json"), max_new_tokens=TOKENS, device="cpu")
    )
    import json

    answered = json.loads((tmp_path / "in.answers.json").read_text())
    assert answered == [
        {"instruction": "Say hi.", "response": alone(tuned, "Say hi.")},
        {"instruction": "Name a color.", "note": 1, "response": alone(tuned, "Name a color.")},
    ]
