"""
train.py's modes that train nothing: answer one instruction (--prompt) or a file of them (--answer_file) with a base
and, with --adapter, the adapter of a LoRA run; write a run in Hugging Face's formats (--export_peft, --export_hf).
"""

import os

from support.adapters import read_adapter_config
from support.checkpoints import TINY_BASE_DIR, load_base_model, load_finetuned
from model import PRETRAINED
from support.common import pick_device, user_cache_dir, write_json_atomic
from support.config_checks import check_inference_flags
from support.instructions import answer, answer_examples, example_prompt, load_answer_file, resolve_template, score_responses
from support.interop import export_merged_hf, export_peft, hf_base_name
from support.safety import UserError
from support.tokenizer import get_tokenizer


def trains_nothing(cfg):
    """Whether the flags ask for answers or an export rather than a training run."""
    return cfg.prompt is not None or bool(cfg.answer_file or cfg.export_peft or cfg.export_hf)


def run_without_training(cfg):
    if cfg.export_peft or cfg.export_hf:
        export_run(cfg)
    elif cfg.prompt is not None:
        answer_prompt(cfg)
    else:
        answer_file(cfg)


def load_for_answering(cfg, device):
    """The base (with --adapter: base + the run's adapter) -> (model, tokenizer, prompt template). An adapter
    answers in the template it was trained with (recorded in its adapter_config.json), unless --prompt_template
    names another. Nothing is trained here: a missing tiny base is an error, not pretrained first."""
    template = cfg.prompt_template
    if cfg.adapter:
        model, tokenizer_name = load_finetuned(cfg.adapter, cfg.init_from, device)
        if template == "auto":
            template = read_adapter_config(cfg.adapter)["metadata"].get("prompt_template", "auto")
    else:
        model, tokenizer_name = load_base_model(cfg.init_from, device, pretrain=False)
    return model, get_tokenizer(tokenizer_name), resolve_template(template, tokenizer_name)


def answer_prompt(cfg):
    """--prompt: load the base (and the adapter of a LoRA run) and answer one instruction."""
    device = pick_device(cfg.device)
    model, tokenizer, template = load_for_answering(cfg, device)
    print(answer(model, tokenizer, cfg.prompt, device, cfg.max_new_tokens, template=template))


def answer_file(cfg):
    """--answer_file: answer every example of an Alpaca-format JSON list greedily (its 'input' used) and write the
    list back with a 'response' added to each example, every other key kept. Examples with an 'answer' key are
    scored for accuracy, examples with an 'output' for exact match and token F1. A chat file's conversations are
    answered at their last assistant turn and scored against it (instructions.score_responses)."""
    examples = load_answer_file(cfg.answer_file)
    out_path = cfg.answers_out or os.path.splitext(cfg.answer_file)[0] + ".answers.json"
    device = pick_device(cfg.device)
    model, tokenizer, template = load_for_answering(cfg, device)
    responses = answer_examples(model, tokenizer, examples, device, cfg.max_new_tokens, template)
    write_json_atomic([{**ex, "response": r} for ex, r in zip(examples, responses)], out_path)
    print(f"answered {len(examples)} examples from {cfg.answer_file} ({template} template); written to {out_path}")
    scored = [(ex, r) for ex, r in zip(examples, responses) if ex.get("answer") or example_prompt(ex)[1]]
    if scored:
        overall, by_kind, _ = score_responses([ex for ex, _ in scored], [r for _, r in scored])
        for kind, scores in list(by_kind.items()) + [("all", overall)]:
            print(f"  {kind:14s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


def export_run(cfg):
    """--export_peft / --export_hf: write a run in Hugging Face's formats (interop.py) and exit.
    --export_peft needs --adapter; when the base is not an HF model (the tiny base, a checkpoint of this script), the
    base is written beside the adapter, in OUT_DIR/base, for PEFT to load it from. The adapter's metadata (run id,
    base, finetune, step, prompt template) travel in the safetensors header, where PEFT ignores them. --export_hf
    writes --init_from's model, with --adapter's adapter merged when given.

    An export writes only into a new or empty folder, or over an earlier export of its kind (interop.export_folder),
    never into the run's own folder or its base's, and holds the folder's run lock while it writes."""
    check_inference_flags(cfg)  # --export_peft without --adapter, or mixed with --prompt / --answer_file
    if cfg.adapter:
        model, _ = load_finetuned(cfg.adapter, cfg.init_from, "cpu")
        trained_on = read_adapter_config(cfg.adapter)["metadata"]  # load_finetuned checked it names its base
    else:
        model, _ = load_base_model(cfg.init_from, "cpu", pretrain=False)
    init_from = trained_on["init_from"] if cfg.adapter and cfg.init_from == "tiny" else cfg.init_from  # as load_finetuned chose it
    base_dir = (TINY_BASE_DIR if init_from == "tiny" else os.path.join(user_cache_dir(), init_from) if init_from in PRETRAINED
                else init_from if os.path.isdir(init_from) else os.path.dirname(init_from))
    protected = [("the --adapter run's own folder", cfg.adapter), (f"the folder of the base ({init_from})", base_dir)]
    if model.config.smear_keys:
        raise UserError(f"{cfg.adapter or cfg.init_from}: its base has smeared keys (the tiny base's default), which Hugging Face's GPT-2 "
                        "cannot hold; to export, pretrain a base with --no-smear_keys and fine-tune on that")
    if cfg.export_hf:
        export_merged_hf(model, cfg.export_hf, protected)
        print(f"wrote {cfg.export_hf}: load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.export_hf!r})")
    if cfg.export_peft:
        base_name = hf_base_name(init_from)
        base_model = None
        if base_name is None:  # PEFT needs an HF base: write ours beside the adapter (full precision; QLoRA users load it in 4 bits)
            base_model = load_base_model(init_from, "cpu", pretrain=False)[0]
        export_peft(model, cfg.export_peft, base_model_name_or_path=base_name, metadata=trained_on, base_model=base_model,
                    protected=protected)
        base_name = base_name or os.path.join(os.path.abspath(cfg.export_peft), "base")
        template = trained_on.get("prompt_template")
        print(f"wrote {cfg.export_peft}: peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base_name!r}), {cfg.export_peft!r})"
              + (f"; it was trained on prompts in the {template!r} template (instructions.format_prompt)" if template else ""))
