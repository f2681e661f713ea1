"""
The checks a program's settings go through before anything is loaded: every value within its valid range, the
combinations that make sense, and the flags with which chat.py answers. A setting that would train nothing,
train on NaN, or be silently ignored is refused with one line that names it and what would be valid (UserError).
"""

import os

import lora
from support.safety import UserError, check_finite_settings, check_optimizer_ranges


def check_classifier_config(cfg, modes):
    """finetune_classifier.py's settings."""
    if cfg.mode not in modes:
        raise UserError(f"--mode {cfg.mode!r}: use one of {', '.join(modes)}")
    if cfg.dataset not in ("embedded", "uci") and not os.path.isfile(cfg.dataset):
        raise UserError(f"--dataset {cfg.dataset!r}: use 'embedded', 'uci', or the path of an existing label<TAB>text file")
    if cfg.init_from == "scratch":
        raise UserError("--init_from scratch: a classifier starts from a pretrained model; use 'tiny', a GPT-2 name or a checkpoint")
    for name in ("epochs", "batch_size", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)}: use an integer >= 1")
    if cfg.max_length < 0:
        raise UserError(f"--max_length {cfg.max_length}: use a positive number of tokens (or 0 for the model's block size)")
    check_finite_settings(cfg)
    check_optimizer_ranges(cfg, {"warmup_ratio": (0 <= cfg.warmup_ratio <= 1, "in [0, 1]"),
                                 "lora_alpha": (cfg.lora_alpha >= 0, ">= 0 (0 = the default, 2 x --lora_rank)")})
    if cfg.mode in ("lora", "qlora"):
        check_lora_scaling(cfg)
        lora.resolve_targets(cfg.lora_targets)  # names the first unknown target
    if cfg.dequantize != "reference" and cfg.mode != "qlora":
        raise UserError(f"--dequantize {cfg.dequantize}: only --mode qlora has a 4-bit base to dequantize; drop the flag")


def check_train_config(cfg, device=None, world_size=1):
    """train.py's settings; under torchrun (world_size processes) also how they share the work and the device."""
    if cfg.finetune not in ("lora", "full"):
        raise ValueError(f"--finetune {cfg.finetune!r}: use 'lora' or 'full'")
    if cfg.quantize not in ("none", "nf4"):
        raise ValueError(f"--quantize {cfg.quantize!r}: use 'none' or 'nf4'")
    if cfg.quantize == "nf4" and (cfg.finetune == "full" or cfg.pretraining):
        raise ValueError("--quantize nf4 freezes the base in 4 bits, so only adapters can train: use it with --finetune lora")
    if cfg.pretraining != (cfg.dataset == "stdlib"):
        raise ValueError("pretraining and the stdlib corpus go together: use --init_from scratch --dataset stdlib, or fine-tune on an instruction dataset")
    if cfg.pack and cfg.pretraining:
        raise ValueError("--pack packs instruction examples; pretraining windows are full already: drop --pack")
    check_values(cfg)
    if cfg.grad_accum % world_size:
        raise UserError(f"--grad_accum {cfg.grad_accum} must be a multiple of the {world_size} processes, so each "
                        f"computes the same number of micro-batches")
    if world_size > 1 and device not in ("cuda", "cpu"):
        raise UserError(f"torchrun data parallelism runs on 'cuda' (NCCL) or 'cpu' (Gloo), not {device!r}: pass "
                        f"--device cuda or --device cpu")


def check_values(cfg):
    """Each setting within its valid range: a value outside it would train nothing, train on NaN, or be ignored,
    and the run would still end as if all were well."""
    check_finite_settings(cfg)
    at_least = {"batch_size": 0, "grad_accum": 1, "lora_rank": 1, "n_layer": 1, "n_head": 1, "n_embd": 1, "block_size": 1,
                "max_new_tokens": 1, "max_iters": 0, "warmup_iters": 0, "eval_interval": 0, "eval_batches": 0, "num_samples": 0,
                "answer_limit": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            zero = " (0 = the default for the job)" if low == 0 and name in ("batch_size", "max_iters", "warmup_iters", "eval_interval", "eval_batches") else ""
            raise UserError(f"--{name} {getattr(cfg, name)}: use an integer >= {low}{zero}")
    check_optimizer_ranges(cfg, {"dropout": (0 <= cfg.dropout < 1, "in [0, 1)")})
    check_lora_scaling(cfg)
    if not cfg.pretraining:
        lora.resolve_targets(cfg.lora_targets)  # names the first unknown target
        defaults = type(cfg)()
        for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "smear_keys"):  # a fine-tuned model keeps its base's shape
            if getattr(cfg, name) != getattr(defaults, name):
                hint = "; dropout on the adapters is --lora_dropout" if name == "dropout" else ""
                raise UserError(f"--{name} {getattr(cfg, name)} shapes a model trained from scratch (--init_from scratch); fine-tuning "
                                f"keeps the shape of its base ({cfg.init_from}), so drop the flag{hint}")


def check_lora_scaling(cfg):
    """alpha / r (rsLoRA: alpha / sqrt(r)) within what lora.load_adapter accepts: an adapter is never trained that
    could not be loaded again."""
    from lora import lora_scaling
    from support.adapters import MAX_LORA_SCALING

    alpha = cfg.lora_alpha  # 0: apply_lora's default, a scaling of 2 (sqrt(2 r) with rsLoRA, within bounds at any rank)
    scaling = lora_scaling(alpha, cfg.lora_rank, getattr(cfg, "use_rslora", False)) if alpha else 0.0
    if scaling > MAX_LORA_SCALING:
        raise UserError(f"--lora_alpha {alpha:g} with --lora_rank {cfg.lora_rank} scales the update by {scaling:g}; use an alpha "
                        f"that scales it by at most {MAX_LORA_SCALING:g} (2 x rank, a scaling of 2, is the usual choice)")


def check_text_flag(flag, text):
    """A text given on the command line must be valid UTF-8 (Python keeps undecodable bytes as lone surrogates) and must
    not hold <|endoftext|>, which the tokenizer would read as the end of the text."""
    from support.tokenizer import EOT_TEXT

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise UserError(f"{flag} is not valid UTF-8 ({what} at position {e.start}): set your terminal or shell to UTF-8 "
                        f"(e.g. LANG=C.UTF-8), or pass the text in UTF-8") from None
    if EOT_TEXT in text:
        raise UserError(f"{flag} holds the text {EOT_TEXT}, which the tokenizer reads as the end-of-text token; leave it out")


def check_answer_flags(cfg):
    """chat.py's --prompt answers one instruction and --answer_file a whole file, then exit."""
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise UserError("--prompt is empty: give the instruction to answer, e.g. --prompt \"Give an antonym of 'cold'.\"")
    if cfg.prompt is not None:
        check_text_flag("--prompt", cfg.prompt)
    if cfg.prompt is not None and cfg.answer_file:
        raise UserError("--prompt and --answer_file both ask for answers: give one of them")
    if cfg.answers_out and not cfg.answer_file:
        raise UserError(f"--answers_out {cfg.answers_out} is where --answer_file writes its answers: give --answer_file IN.json too")
