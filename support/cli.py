"""
The command line: a config dataclass, its comments as the help, becomes argparse flags in groups (parse_config) and
back (run_script); the flags are checked before anything loads; an error meant for the user ends a program in one line.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields

import lora
from support.files import REPO_DIR, UserError


def main_errors():
    """What a program's __main__ prints as one `error: ...` line: ours (UserError is a ValueError), and the errors
    whose message names a path."""
    paths = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
    return (ValueError, KeyError, ConnectionError, *paths)


def error_line(e):
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # a KeyError's str() would add quotes
    return f"error: {' '.join(text.splitlines())}"


@contextlib.contextmanager
def one_line_errors():
    """A program's __main__: an error meant for the user exits with its one line (status 1), no traceback."""
    try:
        yield
    except main_errors() as e:
        sys.exit(error_line(e))


def config_help(config_class):
    """A config dataclass's comments as its --help: ({field: help}, [(group title, description, [fields])]). A
    field's help is the comment ending its line, continued by indented comment lines ("#   ...") right below it;
    other comment lines before a field open a group (title, then description)."""
    import ast
    import inspect
    import io
    import tokenize

    source = textwrap.dedent(inspect.getsource(config_class))
    comments, code_lines = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            indent = token.start[1] + len(token.string) - len(token.string[1:].lstrip())  # where the text starts
            comments[token.start[0]] = (indent, token.string.lstrip("#").strip())
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    body = ast.parse(source).body[0].body
    helps, groups, line = {}, [], 1
    for node in (node for node in body if isinstance(node, ast.AnnAssign)):
        standalone = [comments[n][1] for n in range(line, node.lineno) if n in comments and n not in code_lines]
        if standalone or not groups:
            groups.append((standalone[0] if standalone else "options", " ".join(standalone[1:]), []))
        groups[-1][2].append(node.target.id)
        text, line = [], node.end_lineno + 1
        if node.end_lineno in comments:
            text.append(comments[node.end_lineno][1])
            while line in comments and line not in code_lines and comments[line][0] > node.col_offset + 2:
                text.append(comments[line][1])
                line += 1
        helps[node.target.id] = " ".join(text)
    return helps, groups


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help at most 120 columns wide, helps from column 26, a switch as --[no-]name; the docstring as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26, width=min(shutil.get_terminal_size().columns, 120) - 2)

    def _format_action_invocation(self, action):
        if isinstance(action, argparse.BooleanOptionalAction):
            return "--[no-]" + action.option_strings[0][2:]
        return super()._format_action_invocation(action)

    def _fill_text(self, text, width, indent):  # a docstring as written; a group's description (one line) wrapped
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)

    def _split_lines(self, text, width):  # "all-linear" is one word
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


METAVARS = {int: "N", float: "X", str: "TEXT"}  # what --help shows after a flag that takes a value


def parse_config(config_class, argv=None, description=None, aliases=None):
    """Every field of a config dataclass as a --flag, its comment the help (config_help, in groups), a Literal's
    values the choices; unknown flags are errors. The help adds "(default: ...)" unless it names its default.
    aliases: {old flag name: field}, still accepted, not listed in --help; giving both is an error."""
    from typing import Literal, get_args, get_origin

    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, usage="%(prog)s [options]")
    helps, groups = config_help(config_class)
    by_name = {f.name: f for f in fields(config_class)}
    for title, group_description, names in groups:
        group = parser.add_argument_group(title, group_description or None)
        for f in (by_name[name] for name in names):
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else str(f.default)
            default = f" (default: {shown})" if f.default not in (None, "") and "default" not in helps[f.name] else ""
            options = dict(default=f.default, help=(helps[f.name] + default).replace("%", "%%"))  # argparse formats %
            if f.type is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **options)
            elif get_origin(f.type) is Literal:
                choices = get_args(f.type)
                group.add_argument(f"--{f.name}", type=type(choices[0]), choices=choices, **options)
            else:
                group.add_argument(f"--{f.name}", type=f.type, metavar=METAVARS.get(f.type), **options)
    args = sys.argv[1:] if argv is None else list(argv)
    given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
    for old, name in (aliases or {}).items():
        hidden = dict(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument(f"--{old}", dest=name, type=by_name[name].type, **hidden)
        if {f"--{old}", f"--{name}"} <= given:
            parser.error(f"--{old} is the old name of --{name}: give only --{name}")
    return config_class(**vars(parser.parse_args(args)))


def config_flags(settings):
    """{name: value} -> the flags parse_config reads back as those values (None: left at its default)."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def run_script(script, settings, log_path=None, threads=None):
    """Run train.py or finetune_classifier.py in a child process, `settings` as its flags, as a user would; its
    output goes where ours goes (or into log_path) -> its out_dir/summary.json. threads: its OMP_NUM_THREADS."""
    command = [sys.executable, os.path.join(REPO_DIR, script), *config_flags(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    sys.stdout.flush()  # what we printed so far comes before what the child prints
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        output = dict(stdout=log, stderr=subprocess.STDOUT) if log else {}
        status = subprocess.run(command, env=env, **output).returncode  # in our working directory, as out_dir means
    if status != 0:
        where = "printed above" if log_path is None else f"at the end of {log_path}"
        raise UserError(f"`python {script} {' '.join(command[2:])}` failed with status {status} (its error: {where})")
    with open(os.path.join(settings["out_dir"], "summary.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- checks

JOB_DEFAULTS = ("batch_size", "max_iters", "warmup_iters", "eval_interval", "eval_batches")  # 0: the job's default


def check_ranges(cfg, integers, numbers):
    """Every float finite (NaN passes any range check); integers {name: lowest}; numbers {name: (valid?, what is
    valid)} besides the LoRA and AdamW settings both programs share."""
    for f in fields(cfg):
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise UserError(f"--{f.name} {getattr(cfg, f.name)}: must be a finite number")
    for name, low in integers.items():
        if getattr(cfg, name) < low:
            zero = " (0 = the default for the job)" if name in JOB_DEFAULTS else ""
            raise UserError(f"--{name} {getattr(cfg, name)}: use an integer >= {low}{zero}")
    shared = {
        "learning_rate": (cfg.learning_rate >= 0, ">= 0 (0 = the default for the job)"),
        "lora_alpha": (cfg.lora_alpha >= 0, ">= 0 (0 = the default, 2 x --lora_rank)"),
        "lora_dropout": (0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        "loraplus_ratio": (cfg.loraplus_ratio > 0, "> 0 (1 = plain LoRA)"),
        "min_lr_ratio": (0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        "weight_decay": (cfg.weight_decay >= 0, ">= 0"),
        "beta1": (0 <= cfg.beta1 < 1, "in [0, 1)"),
        "beta2": (0 <= cfg.beta2 < 1, "in [0, 1)"),
        "grad_clip": (cfg.grad_clip >= 0, ">= 0 (0 = no clipping)"),
    }
    for name, (valid, description) in {**shared, **numbers}.items():
        if not valid:
            raise UserError(f"--{name} {getattr(cfg, name)}: use a number {description}")
    check_lora_scaling(cfg)


def check_lora_scaling(cfg):
    """alpha / r (rsLoRA: alpha / sqrt(r)) within what an adapter may load with: none is trained that would not load."""
    from support.adapters import MAX_LORA_SCALING

    alpha = cfg.lora_alpha  # 0: the default, a scaling of 2 (sqrt(2 r) with rsLoRA, within bounds at any rank)
    scaling = lora.lora_scaling(alpha, cfg.lora_rank, getattr(cfg, "use_rslora", False)) if alpha else 0.0
    if scaling > MAX_LORA_SCALING:
        given = f"--lora_alpha {alpha:g} with --lora_rank {cfg.lora_rank} scales the update by {scaling:g}"
        raise UserError(f"{given}; use an alpha that scales it by at most {MAX_LORA_SCALING:g} (2 x rank is usual)")


def check_classifier_config(cfg, modes):
    """finetune_classifier.py's settings."""
    if cfg.mode not in modes:
        raise UserError(f"--mode {cfg.mode!r}: use one of {', '.join(modes)}")
    if cfg.dataset not in ("embedded", "uci") and not os.path.isfile(cfg.dataset):
        raise UserError(f"--dataset {cfg.dataset!r}: use 'embedded', 'uci', or an existing label<TAB>text file")
    if cfg.init_from == "scratch":
        raise UserError("--init_from scratch: a classifier starts from a pretrained model, e.g. 'tiny' or 'gpt2'")
    integers = {"epochs": 1, "batch_size": 1, "lora_rank": 1, "max_length": 0}  # max_length 0: the model's block size
    check_ranges(cfg, integers, {"warmup_ratio": (0 <= cfg.warmup_ratio <= 1, "in [0, 1]")})
    if cfg.mode in ("lora", "qlora"):
        lora.resolve_targets(cfg.lora_targets)  # names the first unknown target
    if cfg.dequantize != "reference" and cfg.mode != "qlora":
        raise UserError(f"--dequantize {cfg.dequantize}: only --mode qlora has a 4-bit base; drop the flag")


def check_train_config(cfg, device=None, world_size=1):
    """train.py's settings; under torchrun (world_size processes) also how they share the work and the device."""
    if cfg.finetune not in ("lora", "full"):
        raise UserError(f"--finetune {cfg.finetune!r}: use 'lora' or 'full'")
    if cfg.quantize not in ("none", "nf4"):
        raise UserError(f"--quantize {cfg.quantize!r}: use 'none' or 'nf4'")
    if cfg.quantize == "nf4" and (cfg.finetune == "full" or cfg.pretraining):
        raise UserError("--quantize nf4 freezes the base, so only adapters train: use it with --finetune lora")
    if cfg.pretraining != (cfg.dataset == "stdlib"):
        raise UserError("pretraining goes with the stdlib corpus: --init_from scratch --dataset stdlib, or fine-tune")
    if cfg.pack and cfg.pretraining:
        raise UserError("--pack packs instruction examples; pretraining windows are full already: drop --pack")
    integers = dict.fromkeys([*JOB_DEFAULTS, "num_samples", "answer_limit"], 0)
    integers |= dict.fromkeys(["grad_accum", "lora_rank", "n_layer", "n_head", "n_embd", "block_size"], 1)
    integers["max_new_tokens"] = 1
    check_ranges(cfg, integers, {"dropout": (0 <= cfg.dropout < 1, "in [0, 1)")})
    if not cfg.pretraining:
        lora.resolve_targets(cfg.lora_targets)  # names the first unknown target
        for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "smear_keys"):  # the base's shape stays
            if getattr(cfg, name) != getattr(type(cfg)(), name):
                hint = "; dropout on the adapters is --lora_dropout" if name == "dropout" else ""
                given = f"--{name} {getattr(cfg, name)} shapes a model trained from scratch"
                raise UserError(f"{given}; fine-tuning keeps its base's ({cfg.init_from}), so drop the flag{hint}")
    if cfg.grad_accum % world_size:
        raise UserError(f"--grad_accum {cfg.grad_accum} must be a multiple of the {world_size} processes (torchrun)")
    if world_size > 1 and device not in ("cuda", "cpu"):
        raise UserError(f"torchrun data parallelism runs on 'cuda' (NCCL) or 'cpu' (Gloo), not {device!r}: pass one")


def check_text_flag(flag, text):
    """Text from the command line: valid UTF-8 (Python keeps undecodable bytes as lone surrogates), without
    <|endoftext|>, which the tokenizer would read as the end of the text."""
    from support.tokenizer import EOT_TEXT

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        where = f"{what} at position {e.start}"
        raise UserError(f"{flag} is not valid UTF-8 ({where}): set your terminal or shell to UTF-8") from None
    if EOT_TEXT in text:
        raise UserError(f"{flag} holds the text {EOT_TEXT}, which the tokenizer reads as the end-of-text; drop it")


def check_answer_flags(cfg):
    """chat.py's --prompt answers one instruction and --answer_file a whole file, then exit."""
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise UserError("--prompt is empty: give the instruction to answer, e.g. --prompt 'Name a colour.'")
    if cfg.prompt is not None:
        check_text_flag("--prompt", cfg.prompt)
    if cfg.prompt is not None and cfg.answer_file:
        raise UserError("--prompt and --answer_file both ask for answers: give one of them")
    if cfg.answers_out and not cfg.answer_file:
        raise UserError(f"--answers_out {cfg.answers_out} is where --answer_file writes its answers: give one")
