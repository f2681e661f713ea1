"""
Talk to a fine-tuned model: load the base and a LoRA run's adapter once, then answer each instruction you type, the
base's answer beside the tuned model's. One model is in memory: the base's answer is the same model with its adapter
switched off (support.adapters.disable_adapters), the tuned answer with it switched on again (set_adapter).

    python train.py                                      # first, a tuned model: its adapter lands in out/instruct
    python chat.py                                       # then talk to it
    python chat.py --adapter out/qlora                   # another run's adapter (a QLoRA one: on its 4-bit base)
    python chat.py --adapter none                        # the base alone (--init_from names it; default: the tiny base)
    printf "Give an antonym of 'hot'.\\nName a fruit.\\n" | python chat.py   # lines from a pipe (or < a file)
    python chat.py --prompt "Give an antonym of 'hot'."      # the tuned model's answer alone, and exit
    python chat.py --answer_file my.json                     # answer (and score) every example of a file, and exit

Each line is one instruction, answered greedily in the prompt template the adapter was trained with. An empty line
is skipped; the end of the input (Ctrl-D) or Ctrl-C ends the conversation.
"""

import os
import sys
from dataclasses import dataclass
from typing import Literal

from support.adapters import ADAPTER_CONFIG, active_adapter, disable_adapters, read_adapter_config, set_adapter
from support.answers import answer, answer_examples, check_max_new_tokens, score_responses
from support.checkpoints import load_base_model, load_finetuned
from support.cli import check_answer_flags, error_line, main_errors, parse_config
from support.files import UserError, write_json_atomic
from support.instruction_files import load_answer_file
from support.instructions import example_prompt, resolve_template
from support.runs import pick_device
from support.tokenizer import get_tokenizer


@dataclass
class ChatConfig:
    # what to talk to
    adapter: str = "out/instruct"  # the out_dir of a train.py LoRA or QLoRA run; 'none': the base alone
    init_from: str = "tiny"  # the base; 'tiny': the base the adapter was trained on (its adapter_config.json says)
    # answering
    base: bool = True  # also answer with the base (the adapter switched off), beside the tuned model
    prompt_template: Literal["auto", "alpaca", "compact", "bare"] = "auto"  # auto: the adapter's own (else bare for the
    #   byte-level base, alpaca for GPT-2)
    max_new_tokens: int = 80  # tokens generated per answer
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda' (or cuda:N), 'mps' or 'cpu'
    # answer and exit, instead of a conversation
    prompt: str = None  # answer this one instruction (the tuned model alone), and exit
    answer_file: str = ""  # answer every example of this Alpaca-format (or chat) JSON file, and exit
    answers_out: str = ""  # where --answer_file writes its examples with a 'response' added; default: IN.answers.json


def load(cfg, device):
    """-> (model, tokenizer, template, name of the active adapter or None): weights-only files, an adapter checked
    against the base it names and answering in the template it was trained with (its adapter_config.json says),
    unless --prompt_template names another. Nothing trains here: a missing tiny base is an error, not pretrained."""
    if cfg.adapter.lower() in ("", "none"):
        cfg.adapter = ""
    elif not os.path.isfile(os.path.join(cfg.adapter, ADAPTER_CONFIG)):
        full_run = os.path.isfile(os.path.join(cfg.adapter, "ckpt.pt"))
        fix = f"a full-weight run: --init_from {cfg.adapter} --adapter none" if full_run else "train one (train.py)"
        raise UserError(
            f"--adapter {cfg.adapter}: no LoRA adapter there ({ADAPTER_CONFIG} missing); {fix}, or talk "
            f"to the base alone with --adapter none"
        )
    template = cfg.prompt_template
    if cfg.adapter:
        model, tokenizer_name = load_finetuned(cfg.adapter, cfg.init_from, device)
        if template == "auto":
            template = read_adapter_config(cfg.adapter)["metadata"].get("prompt_template", "auto")
    else:
        model, tokenizer_name = load_base_model(cfg.init_from, device, pretrain=False)
    check_max_new_tokens(cfg.max_new_tokens, model.config.block_size)
    adapter = active_adapter(model) if cfg.adapter else None
    return model, get_tokenizer(tokenizer_name), resolve_template(template, tokenizer_name), adapter


def answer_prompt(cfg):
    """--prompt: one instruction answered by the tuned model (the base with --adapter none), printed alone."""
    device = pick_device(cfg.device)
    model, tokenizer, template, _ = load(cfg, device)
    print(answer(model, tokenizer, cfg.prompt, device, cfg.max_new_tokens, template=template))


def answer_file(cfg):
    """--answer_file: every example of an Alpaca-format JSON list answered greedily (its 'input' used), the list
    written back with a 'response' added to each, every other key kept. Examples with an 'answer' key are scored for
    accuracy, with an 'output' for exact match and token F1; a chat file's conversations are answered at their last
    assistant turn and scored against it (answers.score_responses)."""
    examples = load_answer_file(cfg.answer_file)
    out_path = cfg.answers_out or os.path.splitext(cfg.answer_file)[0] + ".answers.json"
    device = pick_device(cfg.device)
    model, tokenizer, template, _ = load(cfg, device)
    responses = answer_examples(model, tokenizer, examples, device, cfg.max_new_tokens, template)
    write_json_atomic([{**ex, "response": r} for ex, r in zip(examples, responses)], out_path)
    print(f"answered {len(examples)} examples from {cfg.answer_file} ({template} template); written to {out_path}")
    scored = [(ex, r) for ex, r in zip(examples, responses) if ex.get("answer") or example_prompt(ex)[1]]
    if scored:
        overall, by_kind, _ = score_responses([ex for ex, _ in scored], [r for _, r in scored])
        for kind, scores in list(by_kind.items()) + [("all", overall)]:
            print(
                f"  {kind:14s} "
                + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
            )


def instructions(interactive):
    """The lines typed (after a '> ' prompt) or piped in (each echoed after '> ', so the transcript reads the same);
    empty ones skipped."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:  # Ctrl-D: end the prompt's line
            print()
            return
        if not interactive and not line:
            return
        if line.strip():
            if not interactive:
                print(f"> {line.strip()}")
            yield line.strip()


def chat(cfg, interactive=None):
    """Answer every instruction of stdin; returns [(instruction, base's answer or None, tuned answer or None)]."""
    device = pick_device(cfg.device)
    model, tokenizer, template, adapter = load(cfg, device)
    interactive = sys.stdin.isatty() if interactive is None else interactive
    trained_on = read_adapter_config(cfg.adapter)["metadata"] if adapter else {}
    base_name = trained_on["init_from"] if adapter and cfg.init_from == "tiny" else cfg.init_from  # as loaded
    print(
        f"base: {base_name}"
        + (f"; tuned: {cfg.adapter} ({trained_on['finetune']}, step {trained_on.get('step', '?')})" if adapter else "")
        + f"; {template} template, greedy answers"
        + (". Type an instruction; Ctrl-D ends." if interactive else ""),
        flush=True,
    )
    transcript = []
    for instruction in instructions(interactive):
        base_answer = tuned_answer = None
        if adapter and cfg.base:
            disable_adapters(model)  # the frozen base alone (4-bit under QLoRA, as it trained)
            base_answer = answer(model, tokenizer, instruction, device, cfg.max_new_tokens, template=template)
            set_adapter(model, adapter)
        if adapter:
            tuned_answer = answer(model, tokenizer, instruction, device, cfg.max_new_tokens, template=template)
        else:
            base_answer = answer(model, tokenizer, instruction, device, cfg.max_new_tokens, template=template)
        for label, text in (("base ", base_answer), ("tuned", tuned_answer)):
            if text is not None:  # empty: the answer was only blank space, or the end-of-text token came first
                print(f"  {label}: {text or '(empty)'}", flush=True)
        transcript.append((instruction, base_answer, tuned_answer))
    return transcript


def main(cfg):
    check_answer_flags(cfg)
    if cfg.prompt is not None:
        answer_prompt(cfg)
    elif cfg.answer_file:
        answer_file(cfg)
    else:
        chat(cfg)


if __name__ == "__main__":
    try:
        main(parse_config(ChatConfig, None, __doc__))
    except KeyboardInterrupt:
        print()
    except main_errors() as e:
        sys.exit(error_line(e))
