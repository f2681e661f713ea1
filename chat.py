"""
Talk to a fine-tuned model: load the base and a LoRA run's adapter once, then answer each instruction you type, the
base's answer beside the tuned model's. One model is in memory: the base's answer is the same model with its adapter
switched off (support.adapters.disable_adapters), the tuned answer with it switched on again (set_adapter).

    python train.py                                      # first, a tuned model: its adapter lands in out/instruct
    python chat.py                                       # then talk to it
    python chat.py --adapter out/qlora                   # another run's adapter (a QLoRA one: on its 4-bit base)
    python chat.py --adapter none                        # the base alone (--init_from names it; default: the tiny base)
    printf "Give an antonym of 'hot'.\\nName a fruit.\\n" | python chat.py   # lines from a pipe (or < a file)

Each line is one instruction, answered greedily in the prompt template the adapter was trained with: the answer
`python train.py --adapter out/instruct --prompt "..."` gives, without loading everything again for each one. An
empty line is skipped; the end of the input (Ctrl-D) or Ctrl-C ends the conversation.
"""

import os
import sys
from dataclasses import dataclass
from typing import Literal

import lora
from support.adapters import ADAPTER_CONFIG, active_adapter, disable_adapters, read_adapter_config, set_adapter
from support.common import parse_config, pick_device
from support.instructions import answer, check_max_new_tokens
from support.safety import UserError, error_line, main_errors
from support.train_modes import load_for_answering


@dataclass
class ChatConfig:
    # what to talk to
    adapter: str = "out/instruct"  # the out_dir of a train.py LoRA or QLoRA run; 'none': the base alone
    init_from: str = "tiny"  # the base; 'tiny': the base the adapter was trained on (its adapter_config.json says)
    # answering
    base: bool = True  # also answer with the base (the adapter switched off), beside the tuned model
    prompt_template: Literal["auto", "alpaca", "compact", "bare"] = "auto"  # auto: the adapter's own (else bare for the
                                                                            # byte-level base, alpaca for GPT-2)
    max_new_tokens: int = 80  # tokens generated per answer
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda' (or cuda:N), 'mps' or 'cpu'


def load(cfg, device):
    """-> (model, tokenizer, template, name of the active adapter or None). Loading goes the way train.py --prompt
    loads (support/train_modes.py): weights-only files, an adapter checked against the base it names."""
    if cfg.adapter.lower() in ("", "none"):
        cfg.adapter = ""
    elif not os.path.isfile(os.path.join(cfg.adapter, ADAPTER_CONFIG)):
        full_run = os.path.isfile(os.path.join(cfg.adapter, "ckpt.pt"))
        fix = f"a full-weight run: --init_from {cfg.adapter} --adapter none" if full_run else "train one (train.py)"
        raise UserError(f"--adapter {cfg.adapter}: no LoRA adapter there ({ADAPTER_CONFIG} missing); {fix}, or talk "
                        f"to the base alone with --adapter none")
    model, tokenizer, template = load_for_answering(cfg, device)
    check_max_new_tokens(cfg.max_new_tokens, model.config.block_size)
    return model, tokenizer, template, active_adapter(model) if cfg.adapter else None


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
    print(f"base: {base_name}" + (f"; tuned: {cfg.adapter} ({trained_on['finetune']}, "
          f"step {trained_on.get('step', '?')})" if adapter else "") + f"; {template} template, greedy answers"
          + (". Type an instruction; Ctrl-D ends." if interactive else ""), flush=True)
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


if __name__ == "__main__":
    try:
        chat(parse_config(ChatConfig, None, __doc__))
    except KeyboardInterrupt:
        print()
    except main_errors() as e:
        sys.exit(error_line(e))
