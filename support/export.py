"""
Write a train.py run in Hugging Face's formats (support/peft_format.py, support/hf_format.py):

    python -m support.export --adapter out/instruct --peft out/peft   # the adapter for PEFT
    python -m support.export --adapter out/instruct --hf out/hf       # base + merged adapter for transformers' GPT-2
    python -m support.export --init_from checkpoints/plain-base --hf out/tiny-hf   # a base alone (no smeared keys)

--peft needs --adapter; a base that is not an HF model (the tiny base) is written beside the adapter, in OUT/base.
An export writes only into a new or empty folder, or over an earlier export of its kind, never into the run's
own folder or its base's.
"""

import os
import sys
from dataclasses import dataclass

from model import PRETRAINED
from support.adapters import read_adapter_config
from support.checkpoints import TINY_BASE_DIR, load_base_model, load_finetuned
from support.cli import error_line, main_errors, parse_config
from support.files import UserError, user_cache_dir
from support.hf_format import export_merged_hf, hf_base_name
from support.peft_format import export_peft


@dataclass
class ExportConfig:
    # what to export
    adapter: str = ""  # the out_dir of a train.py LoRA or QLoRA run; empty: --init_from's model alone
    init_from: str = "tiny"  # the base; 'tiny': the base the adapter was trained on (its adapter_config.json says)
    # where to
    peft: str = ""  # write the --adapter run's adapter in PEFT's format to this directory
    hf: str = ""  # write --init_from's model (--adapter's merged in) as an HF GPT-2 directory


def export_run(cfg):
    if not (cfg.peft or cfg.hf):
        raise UserError("nothing to export: give --peft DIR (the adapter for PEFT) and/or --hf DIR (transformers')")
    if cfg.peft and not cfg.adapter:
        raise UserError("--peft needs --adapter RUN_DIR, the out_dir of a LoRA or QLoRA run (whose adapter it writes)")
    if cfg.adapter:
        model, _ = load_finetuned(cfg.adapter, cfg.init_from, "cpu")
        trained_on = read_adapter_config(cfg.adapter)["metadata"]  # load_finetuned checked it names its base
    else:
        model, _ = load_base_model(cfg.init_from, "cpu", pretrain=False)
    init_from = trained_on["init_from"] if cfg.adapter and cfg.init_from == "tiny" else cfg.init_from  # as loaded
    if init_from == "tiny" or init_from in PRETRAINED:
        base_dir = TINY_BASE_DIR if init_from == "tiny" else os.path.join(user_cache_dir(), init_from)
    else:
        base_dir = init_from if os.path.isdir(init_from) else os.path.dirname(init_from)
    protected = [("the --adapter run's own folder", cfg.adapter), (f"the folder of the base ({init_from})", base_dir)]
    if model.config.smear_keys:
        raise UserError(
            f"{cfg.adapter or cfg.init_from}: its base has smeared keys (the tiny base's default), which "
            "GPT-2 cannot hold; to export, pretrain a base with --no-smear_keys and fine-tune on that"
        )
    if cfg.hf:
        export_merged_hf(model, cfg.hf, protected)
        print(f"wrote {cfg.hf}: load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.hf!r})")
    if cfg.peft:
        base_name = hf_base_name(init_from)
        # PEFT needs an HF base: without one, ours goes beside the adapter (full precision; QLoRA loads it in 4 bits)
        base_model = load_base_model(init_from, "cpu", pretrain=False)[0] if base_name is None else None
        export_peft(model, cfg.peft, base_name, metadata=trained_on, base_model=base_model, protected=protected)
        base_name = base_name or os.path.join(os.path.abspath(cfg.peft), "base")
        template = trained_on.get("prompt_template")
        loaded = f"peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base_name!r}), {cfg.peft!r})"
        print(
            f"wrote {cfg.peft}: {loaded}" + (f"; trained on prompts in the {template!r} template" if template else "")
        )


def parse_args(argv=None):
    return parse_config(ExportConfig, argv, __doc__)


if __name__ == "__main__":
    try:
        export_run(parse_args())
    except main_errors() as e:
        sys.exit(error_line(e))
