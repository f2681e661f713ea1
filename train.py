"""
One training loop for the language-model jobs of this repository (nanoGPT's train.py is the model for it). The
pieces it is made of live in modules: the model (model.py, lora.py, quantize.py), the data (corpus.py,
instructions.py), the optimizer (optim.py), what runs start from (checkpoints.py) and the plumbing (common.py,
safety.py); this file is the program that puts them together.

    python train.py                                   # LoRA instruction tuning of the tiny base (pretrained first if missing)
    python train.py --finetune full                   # full fine-tuning instead of LoRA
    python train.py --quantize nf4                    # QLoRA: LoRA on a 4-bit NF4 base
    python train.py --init_from scratch --dataset stdlib --out_dir checkpoints/tiny-base   # pretrain the tiny base
    python train.py --adapter out/instruct --prompt "Give an antonym of 'hot'."             # answer with base + adapter
    python train.py --adapter out/instruct --answer_file my.json --answers_out answered.json  # answer a whole file
    python train.py --adapter out/instruct --export_peft out/peft                           # the adapter in PEFT's format
    torchrun --nproc_per_node=4 train.py --init_from gpt2 --dataset instruction-data --grad_accum 8   # data-parallel

`python train.py --help` lists every hyperparameter with its default.
"""

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from checkpoints import load_base_model, load_finetuned
from common import (autocast_context, parse_config, peak_memory_bytes, pick_device, reset_peak_memory, save_atomic, save_figure_atomic,
                    training_state_bytes, write_csv_atomic, write_json_atomic)
from corpus import PretrainingData
from ddp import init_world
from instructions import InstructionData, answer, answer_examples, check_max_new_tokens, resolve_template
from lora import parse_targets
from model import GPT, PRETRAINED, GPTConfig, count_parameters, mean_token_loss
from optim import clip_gradients, lr_at_step, make_optimizer, set_learning_rate
from safety import (UserError, check_finite, check_finite_settings, check_optimizer_ranges, error_line, load_tensor_file, lock_out_dir, main_errors,
                    new_run_id, remove_earlier_run)


# The default budget: a fresh clone pretrains the tiny base and LoRA-tunes it in under ten minutes on two CPU cores.
PRETRAIN_ITERS = 1000
TINY_FINETUNE_ITERS = 800
GPT2_FINETUNE_ITERS = 200  # GPT-2 on instruction-data: 200 x 16 examples is about 3 epochs of its 935


@dataclass
class TrainConfig:
    # what to start from, what to learn
    init_from: str = field(default="tiny", metadata={"help": "'tiny' (the offline base in checkpoints/tiny-base, pretrained first if missing), 'scratch', one of " + ", ".join(PRETRAINED) + ", or a checkpoint file/directory"})
    corpus: str = field(default="docstrings", metadata={"help": "pretraining text, comma-separated: docstrings, comments, topics, code (see corpus.py)"})
    dataset: str = field(default="embedded", metadata={"help": "'stdlib' (pretraining corpus), 'embedded' (data/instructions.json), 'instruction-data' or 'alpaca' (downloaded), or a path to an Alpaca-format or chat ({'messages': [...]}) .json/.jsonl"})
    out_dir: str = field(default="out/instruct", metadata={"help": "where the log, plots, samples, summary.json and checkpoints go"})
    finetune: str = field(default="lora", metadata={"help": "'lora' (train adapters only) or 'full' (train every weight); ignored when pretraining"})
    quantize: str = field(default="none", metadata={"help": "'none' or 'nf4' (QLoRA: 4-bit NF4 base with double quantization; needs --finetune lora)"})
    # LoRA
    lora_rank: int = field(default=32, metadata={"help": "rank r of the update B @ A"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA scaling numerator: scaling = alpha / r (alpha / sqrt(r) with --use_rslora); 0 = 2 x rank, a scaling of 2 at every rank"})
    lora_targets: str = field(default="all-linear", metadata={"help": "comma-separated layers to adapt: q, k, v, o, mlp_in, mlp_out, or all-linear"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input (0.05 is common; on the tiny base it cost a third of the step time and bought no accuracy)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA magnitude/direction decomposition (arXiv 2402.09353)"})
    loraplus_ratio: float = field(default=1.0, metadata={"help": "LoRA+: learning rate of B = ratio x that of A (arXiv 2402.12354 suggests 16); 1 = plain LoRA"})
    # data
    mask_prompt: bool = field(default=True, metadata={"help": "leave the prompt out of the loss (train on responses only, as Alpaca's own training code does; for chat data: on assistant turns only)"})
    prompt_template: str = field(default="auto", metadata={"help": "'alpaca', 'compact' (Alpaca's without its preamble sentence), or 'auto': compact for the byte-level tiny base, alpaca for GPT-2 (chat data always uses instructions.CHAT_TEMPLATE)"})
    pack: bool = field(default=False, metadata={"help": "pack several training examples per row up to the context (best-fit decreasing), each attending only to itself"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (over all processes under torchrun)"})
    # model shape when --init_from scratch: the tiny base, 4 layers x 128 wide, byte-level, 0.86M parameters. Small
    # on purpose: in five CPU minutes a 3.4M model sees too few bytes to get past predicting letters from their
    # frequencies (2.6 nats/byte); this one gets through that stage and on to ~1.6 (README, "the tiny base").
    # 256 bytes of context: the longest embedded example in the compact template is ~160 bytes.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    smear_keys: bool = field(default=True, metadata={"help": "smeared keys (model.CausalSelfAttention.smear): each key also carries its predecessor, so the tiny base learns to copy from its context (--no-smear_keys: plain GPT-2 attention)"})
    # optimisation
    max_iters: int = field(default=0, metadata={"help": f"optimizer steps (0 = {PRETRAIN_ITERS} when pretraining, {TINY_FINETUNE_ITERS} when fine-tuning the tiny base, {GPT2_FINETUNE_ITERS} when fine-tuning GPT-2)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = 4e-3 pretraining, 3e-3 LoRA, full: 2e-3 on the tiny base, 3e-4 on GPT-2)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate x this"})
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup steps (0 = 5% of max_iters)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay, on matrices only"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    # evaluation, logging, checkpoints
    eval_interval: int = field(default=0, metadata={"help": "evaluate and checkpoint every N steps (0 = 10 times per run)"})
    eval_batches: int = field(default=0, metadata={"help": "validation batches per evaluation (0 = the whole validation split)"})
    num_samples: int = field(default=3, metadata={"help": "held-out answers printed before and after fine-tuning"})
    answer_limit: int = field(default=500, metadata={"help": "test examples answered greedily and scored before and after fine-tuning (the first N; 0 = none)"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens generated per answer"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt (same seed: same trajectory)"})
    seed: int = 1337
    # system
    device: str = field(default="auto", metadata={"help": "'auto' (cuda, then mps, then cpu), 'cuda', 'mps' or 'cpu'"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (worth it on GPU for long runs)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in backward instead of storing them (less memory, ~1 more forward)"})
    # inference only
    adapter: str = field(default="", metadata={"help": "a LoRA run's out_dir: load base + adapter (with --prompt, --answer_file, --export_peft or --export_hf)"})
    prompt: str = field(default=None, metadata={"help": "answer this instruction with the model (and --adapter) and exit"})
    answer_file: str = field(default="", metadata={"help": "answer every example of this Alpaca-format (or chat) JSON file (with --adapter) and exit"})
    answers_out: str = field(default="", metadata={"help": "where --answer_file writes its examples with a 'response' added (default: IN.answers.json)"})
    export_peft: str = field(default="", metadata={"help": "write the --adapter run's adapter in PEFT's format to this directory and exit"})
    export_hf: str = field(default="", metadata={"help": "write the model (--init_from, with the --adapter run's adapter merged) as an HF GPT-2 directory and exit"})

    @property
    def pretraining(self):
        return self.init_from == "scratch"


def resolve_defaults(cfg):
    """Fill in the settings whose sensible value depends on the job (the 0 defaults above). A model that read GPT-2's
    weights needs gentler full fine-tuning and fewer steps than the tiny base, which starts far from done."""
    pre, full = cfg.pretraining, cfg.finetune == "full"
    gpt2 = cfg.init_from in PRETRAINED or os.path.isfile(os.path.join(cfg.init_from, "model.safetensors"))
    cfg.max_iters = cfg.max_iters or (PRETRAIN_ITERS if pre else GPT2_FINETUNE_ITERS if gpt2 else TINY_FINETUNE_ITERS)
    cfg.learning_rate = cfg.learning_rate or (4e-3 if pre else (3e-4 if gpt2 else 2e-3) if full else 3e-3)
    cfg.lora_alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    cfg.warmup_iters = cfg.warmup_iters or max(1, cfg.max_iters // 20)
    cfg.eval_interval = cfg.eval_interval or max(1, cfg.max_iters // 10)
    return cfg


def check_train_config(cfg):
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


def check_values(cfg):
    """Each setting within its valid range: a value outside it would train nothing, train on NaN, or be ignored,
    and the run would still end as if all were well."""
    check_finite_settings(cfg)
    at_least = {"batch_size": 1, "grad_accum": 1, "lora_rank": 1, "n_layer": 1, "n_head": 1, "n_embd": 1, "block_size": 1,
                "max_new_tokens": 1, "max_iters": 0, "warmup_iters": 0, "eval_interval": 0, "eval_batches": 0, "num_samples": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            zero = " (0 = the default for the job)" if low == 0 and name in ("max_iters", "warmup_iters", "eval_interval", "eval_batches") else ""
            raise UserError(f"--{name} {getattr(cfg, name)}: use an integer >= {low}{zero}")
    check_optimizer_ranges(cfg, {"dropout": (0 <= cfg.dropout < 1, "in [0, 1)")})
    if not cfg.pretraining:
        from lora import resolve_targets

        resolve_targets(parse_targets(cfg.lora_targets))  # names the first unknown target
        defaults = TrainConfig()
        for name in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "smear_keys"):  # a fine-tuned model keeps its base's shape
            if getattr(cfg, name) != getattr(defaults, name):
                hint = "; dropout on the adapters is --lora_dropout" if name == "dropout" else ""
                raise UserError(f"--{name} {getattr(cfg, name)} shapes a model trained from scratch (--init_from scratch); fine-tuning "
                                f"keeps the shape of its base ({cfg.init_from}), so drop the flag{hint}")


def check_inference_flags(cfg):
    """--prompt answers one instruction and --answer_file a whole file, then exit; --export_peft / --export_hf write
    the model in Hugging Face's formats and exit. --adapter only says which adapter to answer with or export, so it
    needs one of them (a training run would silently ignore it)."""
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise UserError("--prompt is empty: give the instruction to answer, e.g. --prompt \"Give an antonym of 'cold'.\"")
    if cfg.prompt is not None and cfg.answer_file:
        raise UserError("--prompt and --answer_file both ask for answers: give one of them")
    if cfg.answers_out and not cfg.answer_file:
        raise UserError(f"--answers_out {cfg.answers_out} is where --answer_file writes its answers: give --answer_file IN.json too")
    exporting = bool(cfg.export_peft or cfg.export_hf)
    if exporting and (cfg.prompt is not None or cfg.answer_file):
        raise UserError("--export_peft / --export_hf write the model and exit, --prompt / --answer_file answer with it: give one of them")
    if cfg.export_peft and not cfg.adapter:
        raise UserError("--export_peft needs --adapter RUN_DIR, the out_dir of a LoRA or QLoRA run (whose adapter it writes)")
    if cfg.adapter and cfg.prompt is None and not cfg.answer_file and not exporting:
        raise UserError(f"--adapter {cfg.adapter} needs --prompt \"...\" (one instruction) or --answer_file IN.json (a file of them) to "
                        f"answer with it, or --export_peft / --export_hf DIR to export it; it does not train. To continue that run's "
                        f"training use --out_dir {cfg.adapter} --resume")


# ---------------------------------------------------------------------------------------------- outputs


def plot_losses(rows, path, title):
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train", alpha=0.6)
    evals = [r for r in rows if r["val_loss"] != ""]
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


def chat_display(example):
    """A conversation shown like an Alpaca sample: the user turn before the last assistant turn, and that turn."""
    from instructions import chat_prompt

    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "(no user turn)", "output": chat_prompt(messages)[1]}


def answer_report(examples, before, after):
    """Score the test answers before and after training -> (summary fields, per-kind rows, per-example records).
    Alpaca examples are scored against their key answer (accuracy), where they have one, and their output (exact
    match, token F1). A chat dataset's conversations were answered at their last assistant turn, and that turn is the
    reference they are scored against (exact match and F1 only: chat data has no key answers); their records keep
    the "messages" (chat_display shows them like an Alpaca sample)."""
    from instructions import score_responses

    overall_before, kinds_before, rows_before = score_responses(examples, before)
    overall_after, kinds_after, rows_after = score_responses(examples, after)
    fields = {}
    for metric in ("accuracy", "exact_match", "f1"):
        if metric in overall_after:
            fields[f"test_{metric}_before"], fields[f"test_{metric}_after"] = overall_before[metric], overall_after[metric]
    by_kind = []
    for kind, after_scores in kinds_after.items():
        row = {"kind": kind, "examples": after_scores["examples"]}
        for metric in ("accuracy", "exact_match", "f1"):
            if metric in after_scores:
                row[f"{metric}_before"], row[f"{metric}_after"] = kinds_before[kind][metric], after_scores[metric]
        by_kind.append(row)
    records = []
    for ex, b, a, rb, ra in zip(examples, before, after, rows_before, rows_after):
        record = {**ex, "before": b, "after": a}
        if "correct" in ra:
            record["correct_before"], record["correct_after"] = rb["correct"], ra["correct"]
        records.append(record)
    return fields, by_kind, records


def print_answer_table(by_kind, fields):
    metric = "accuracy" if "test_accuracy_after" in fields else "f1"
    print(f"\nanswers on the test split ({metric}{': key answer in the response' if metric == 'accuracy' else ' against the reference'}, exact match):")
    print(f"  {'kind':14s} {'n':>4s}  {metric + ' before -> after':>24s}  {'exact before -> after':>22s}")
    for row in by_kind:
        print(f"  {row['kind']:14s} {row['examples']:4d}  {row[metric + '_before']:10.2f} -> {row[metric + '_after']:<10.2f}  "
              f"{row['exact_match_before']:9.2f} -> {row['exact_match_after']:<9.2f}")
    print(f"  {'all':14s} {sum(r['examples'] for r in by_kind):4d}  {fields['test_' + metric + '_before']:10.2f} -> {fields['test_' + metric + '_after']:<10.2f}  "
          f"{fields['test_exact_match_before']:9.2f} -> {fields['test_exact_match_after']:<9.2f}")


# ---------------------------------------------------------------------------------------------- the loop


def prepare_model(cfg, device):
    """Build or load the model and make the chosen parameters trainable -> (model, tokenizer name, finetune label)."""
    if cfg.pretraining:
        config = GPTConfig(block_size=cfg.block_size, vocab_size=257, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, smear_keys=cfg.smear_keys)
        return GPT(config).to(device), "bytes", "pretrain"
    model, tokenizer_name = load_base_model(cfg.init_from, device)
    if cfg.finetune == "full":
        return model, tokenizer_name, "full"
    if cfg.quantize == "nf4":
        import dequantize_kernel
        from quantize import quantize_model

        quantize_model(model)
        if str(device).startswith("cpu"):
            print(f"4-bit base; dequantized on the CPU by {dequantize_kernel.status()}")
    from lora import apply_lora

    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=parse_targets(cfg.lora_targets), dropout=cfg.lora_dropout,
               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    return model, tokenizer_name, "qlora" if cfg.quantize == "nf4" else "lora"


RUN_FILES = ("ckpt.pt", "adapter_model.safetensors", "adapter_config.json", "log.csv", "loss.png", "samples.json", "summary.json")


def settings_that_shape_the_run(cfg):
    """The settings a checkpoint's tensors and optimizer state were made with: --resume must use the same ones.
    (optimizer.load_state_dict would also silently bring back the saved weight decay and betas.) For fine-tuning
    also those that make the examples' token sequences and batches (--prompt_template, --pack): with others the
    resumed run would train on other data than the straight run, and score its answers in another template."""
    names = ["init_from", "dataset", "loraplus_ratio", "weight_decay", "beta1", "beta2"]
    if cfg.pretraining:
        return names + ["n_layer", "n_head", "n_embd", "block_size", "smear_keys"]
    names += ["finetune", "prompt_template", "pack"]
    if cfg.finetune == "lora":
        names += ["quantize", "lora_rank", "lora_alpha", "lora_targets", "use_rslora", "use_dora"]
    return names


def load_resume_checkpoint(path, cfg):
    """out_dir/ckpt.pt for --resume; refused unless it was made with this run's settings_that_shape_the_run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    ckpt = load_tensor_file(path, fix="start the run afresh, without --resume")
    for key in ("train_config", "iter", "optimizer", "rng", "log", "before"):
        if key not in ckpt:
            raise UserError(f"{path} has no {key!r}, so --resume cannot continue from it; start the run afresh, without --resume")
    saved = {"pack": False, **ckpt["train_config"]}  # checkpoints written before --pack existed trained unpacked
    differ = [f"--{name} {saved.get(name, '(not recorded)')} (now {getattr(cfg, name)})" for name in settings_that_shape_the_run(cfg)
              if saved.get(name) != getattr(cfg, name)]
    if differ:
        raise UserError(f"--resume: {path} was trained with {', '.join(differ)}; resume with the saved settings, "
                        f"or start a new run in another --out_dir")
    return ckpt


def restore_random_state(ckpt, device):
    """The random generators as the checkpoint left them: the CPU's (batches, dropout on the CPU) and, on a GPU, the
    CUDA ones (dropout there draws from them), so a resumed run repeats the uninterrupted one."""
    torch.set_rng_state(ckpt["rng"])
    if device.startswith("cuda") and ckpt.get("cuda_rng"):
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


def load_trained_tensors(model, ckpt, path):
    """The checkpoint's tensors into the model, every one accounted for: exactly the parameters that train (LoRA),
    or every weight (pretraining, full fine-tuning), each with its shape."""
    if "model" in ckpt:
        model.load_weights(ckpt["model"])  # checks missing, unexpected and wrongly shaped tensors
        return
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stored = ckpt.get("trainable", {})
    missing, unexpected = [n for n in trainable if n not in stored], [n for n in stored if n not in trainable]
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model: " + "; ".join(
            part for part in (missing and f"{len(missing)} trained tensors missing, e.g. {missing[0]!r}",
                              unexpected and f"{len(unexpected)} it has no place for, e.g. {unexpected[0]!r}") if part))
    for n, v in stored.items():
        if v.shape != trainable[n].shape:
            raise UserError(f"{path}: tensor {n!r} is {tuple(v.shape)} but the model's is {tuple(trainable[n].shape)}")
    model.load_state_dict(stored, strict=False)  # not strict only because the frozen base is not in the file: checked above


def last_saved_step(rows):
    """The step of the run's last checkpoint: each evaluation (a row with a validation loss) ends with a save."""
    saved = [r["iter"] for r in rows if r["val_loss"] != ""]
    return saved[-1] if saved else None


def train(cfg):
    """Run one job end to end; returns the summary dict that is also written to out_dir/summary.json. The run owns
    out_dir while it lasts: a second run on the same folder is refused (safety.lock_out_dir). Under torchrun, rank 0
    alone writes to out_dir, so it holds the lock for all ranks, and the other ranks return None."""
    check_train_config(cfg)
    device = pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    world = init_world(device)  # under torchrun: this process's rank among world.size (ddp.py); else rank 0 of 1
    try:
        world.micro_batches(cfg.grad_accum)  # a --grad_accum the processes cannot share fails here, before any work
        if not world.is_main:
            cfg.progress = False  # rank 0 alone reports (its stdout is the only one kept, see ddp.init_world)
            return run_training(cfg, world)
        with lock_out_dir(cfg.out_dir):
            return run_training(cfg, world)
    finally:
        world.close()


def run_training(cfg, world=None):
    """train() without the lock (and, by default, as the only process)."""
    from ddp import World
    from tokenizer import get_tokenizer

    world = world or World()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer_name, mode = prepare_model(cfg, device)
    tokenizer = get_tokenizer(tokenizer_name)
    template = resolve_template(cfg.prompt_template, tokenizer_name)
    block_size = model.config.block_size
    if not cfg.pretraining:  # fine-tuning answers held-out instructions before and after
        check_max_new_tokens(cfg.max_new_tokens, block_size)
    if cfg.pretraining:
        data = PretrainingData(tokenizer, block_size, cfg.seed, cfg.corpus)
    else:
        data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, template, pack=cfg.pack, grad_accum=cfg.grad_accum)
        answered = data.test_examples[: cfg.answer_limit]  # Alpaca examples, or conversations (answered at their last assistant turn)
    model.gradient_checkpointing = cfg.grad_checkpointing
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.loraplus_ratio)
    trainable, total = count_parameters(model)
    print(f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}; {data.describe()}")

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start, rows, before, run_id = 0, [], {}, new_run_id()
    if cfg.resume:
        ckpt = load_resume_checkpoint(ckpt_path, cfg)
        load_trained_tensors(model, ckpt, ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_random_state(ckpt, device)
        start, rows, before = ckpt["iter"], ckpt["log"], ckpt["before"]
        run_id = ckpt.get("run_id", run_id)  # checkpoints written before run ids get one now
        print(f"resumed from {ckpt_path} at step {start}")
    elif world.is_main:  # the other ranks write nothing to out_dir
        remove_earlier_run(cfg.out_dir, RUN_FILES, hint=" (--resume continues it instead)")
    run_model = world.wrap(torch.compile(model) if cfg.compile else model)
    if world.size > 1:  # each rank its own dropout masks, reproducible from (seed, rank, step resumed at)
        torch.manual_seed(cfg.seed + world.rank + 1_000_003 * start)
    val_batches = data.val_batches(cfg.batch_size)
    val_batches = val_batches[: cfg.eval_batches] if cfg.eval_batches else val_batches

    if not before and world.is_main:  # measured once, before the first step, and carried through resumes
        before["val_loss"] = mean_token_loss(model, val_batches, device)
        if not cfg.pretraining:
            before["test_loss"] = mean_token_loss(model, data.val_batches(cfg.batch_size, "test"), device)
            before["answers"] = answer_examples(model, tokenizer, answered, device, cfg.max_new_tokens, template)
        print(f"validation loss before training: {before['val_loss']:.4f}")

    reset_peak_memory(device)
    t0, tokens_seen = time.time(), (rows[-1]["tokens"] if rows else 0)
    elapsed_before, tokens_at_start = (rows[-1]["seconds"] if rows else 0.0), tokens_seen
    model.train()
    steps = range(start, cfg.max_iters)
    if cfg.progress:
        from tqdm import tqdm

        steps = tqdm(steps, initial=start, total=cfg.max_iters, desc=mode, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    for step in steps:
        lr = lr_at_step(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
        set_learning_rate(optimizer, lr)
        step_loss, step_tokens = 0.0, 0
        micro_batches = world.micro_batches(cfg.grad_accum)  # all of them for one process
        for micro in micro_batches:
            x, y, *segments = data.train_batch(step, micro, cfg.batch_size)  # segment ids only with --pack
            x, y = x.to(device), y.to(device)
            segment_ids = segments[0].to(device) if segments else None
            with world.sync_unless(run_model, last=micro == micro_batches[-1]), autocast_context(device):
                loss = run_model(x, y, segment_ids=segment_ids)[1]  # drop the logits now: `_` would keep B x T x vocab floats alive through backward
                # x world.size: DDP averages the ranks' gradients, and the step's gradient is the mean over all grad_accum micro-batches
                (loss * world.size / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            step_tokens += x.numel()
        step_loss, step_tokens = world.sum(step_loss, step_tokens)
        tokens_seen += int(step_tokens)
        grad_norm = clip_gradients(model, cfg.grad_clip)  # of the gradients all ranks share after DDP's all-reduce
        check_finite(step + 1, f"the training loss is {step_loss:g} and the gradient norm {grad_norm:g}", [step_loss, grad_norm],
                     last_saved_step(rows), cfg.out_dir, cfg.learning_rate)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = elapsed_before + time.time() - t0
        row = {"iter": step + 1, "lr": lr, "train_loss": step_loss, "val_loss": "", "tokens": tokens_seen, "seconds": round(seconds, 3)}
        if world.is_main and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters):
            row["val_loss"] = mean_token_loss(model, val_batches, device)
            check_finite(step + 1, f"the validation loss is {row['val_loss']:g}", [row["val_loss"]], last_saved_step(rows), cfg.out_dir, cfg.learning_rate)
        rows.append(row)
        if cfg.progress:
            tokens_per_second = (tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
            steps.set_postfix(loss=f"{step_loss:.3f}", val=f"{row['val_loss']:.3f}" if row["val_loss"] != "" else "-", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        if row["val_loss"] != "":
            save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step + 1, rows, before, ckpt_path, run_id)
            write_csv_atomic(rows, os.path.join(cfg.out_dir, "log.csv"), list(rows[0]))
            plot_losses(rows, os.path.join(cfg.out_dir, "loss.png"), f"{mode} on {cfg.dataset}")

    if not world.is_main:  # rank 0 evaluates and writes the results
        return None
    summary = {  # every setting as the flag that gives it: --init_from, --finetune (None when pretraining), --quantize
        "init_from": cfg.init_from, "finetune": None if cfg.pretraining else cfg.finetune, "quantize": cfg.quantize, "dataset": cfg.dataset,
        "lora_rank": cfg.lora_rank if mode in ("lora", "qlora") else None,
        "lora_alpha": cfg.lora_alpha if mode in ("lora", "qlora") else None, "lora_targets": cfg.lora_targets if mode in ("lora", "qlora") else None,
        "trainable_params": trainable, "total_params": total, "train_examples": len(data.train) if not cfg.pretraining else None,
        "val_loss_before": before["val_loss"], "val_loss_after": rows[-1]["val_loss"] if rows else before["val_loss"],
        "steps": cfg.max_iters, "tokens": tokens_seen, "seconds": rows[-1]["seconds"] if rows else 0.0,
        "seconds_per_step": (rows[-1]["seconds"] / len(rows)) if rows else None, "peak_memory_bytes": peak_memory_bytes(device),
        "training_state_bytes": training_state_bytes(model, optimizer), "device": device, "config": asdict(cfg), "run_id": run_id,
    }
    print(f"validation loss: {summary['val_loss_before']:.4f} before -> {summary['val_loss_after']:.4f} after "
          f"{cfg.max_iters} steps in {summary['seconds']:.0f} s; peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
    if not cfg.pretraining:
        summary["test_loss_before"] = before["test_loss"]
        summary["test_loss_after"] = mean_token_loss(model, data.val_batches(cfg.batch_size, "test"), device)
        check_finite(cfg.max_iters, f"the test loss is {summary['test_loss_after']:g}", [summary["test_loss_after"]], last_saved_step(rows),
                     cfg.out_dir, cfg.learning_rate)
        summary["prompt_template"] = template
        after = answer_examples(model, tokenizer, answered, device, cfg.max_new_tokens, template)
        fields, by_kind, records = answer_report(answered, before["answers"], after)
        summary.update(fields)
        summary["test_by_kind"] = by_kind
        for record in records[: cfg.num_samples]:
            shown = record if "messages" not in record else chat_display(record)
            print(f"\n### {shown['instruction']}" + (f"\n    input:    {shown['input']}" if shown.get("input") else "")
                  + f"\n    expected: {shown['output']}\n    before:   {record['before']}\n    after:    {record['after']}")
        write_json_atomic(records, os.path.join(cfg.out_dir, "samples.json"))
        if by_kind:
            write_csv_atomic(by_kind, os.path.join(cfg.out_dir, "answers.csv"), list(by_kind[0]))
            print_answer_table(by_kind, fields)
        print(f"\ntest loss: {summary['test_loss_before']:.4f} before -> {summary['test_loss_after']:.4f} after")
    print(f"{mode}: {trainable:,} trainable / {total:,} total parameters; outputs in {cfg.out_dir}")
    write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    return summary


def save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step, rows, before, path, run_id=None):
    """Pretraining and full fine-tuning save every weight; LoRA saves only what trained (the adapter file is the
    shareable artefact, ckpt.pt adds the optimizer state needed to resume). Everything in ckpt.pt is a tensor or a
    plain container, so it loads with torch.load(weights_only=True)."""
    ckpt = {"model_config": vars(model.config).copy(), "tokenizer": tokenizer_name, "train_config": asdict(cfg), "mode": mode,
            "iter": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "log": rows, "before": before,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None, "run_id": run_id}
    if mode in ("lora", "qlora"):
        from lora import save_adapter

        ckpt["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        # the adapter describes its own base, so --adapter needs no other file of the run
        trained_on = {"run_id": run_id, "init_from": cfg.init_from, "finetune": mode, "step": step,
                      "prompt_template": resolve_template(cfg.prompt_template, tokenizer_name)}
        save_adapter(model, os.path.dirname(path), metadata=trained_on)  # adapter_model.safetensors + adapter_config.json
    else:
        ckpt["model"] = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_atomic(ckpt, path)


def load_for_answering(cfg, device):
    """The base (with --adapter: base + the run's adapter) -> (model, tokenizer, prompt template). An adapter
    answers in the template it was trained with (recorded in its adapter_config.json), unless --prompt_template
    names another."""
    from lora import read_adapter_config
    from tokenizer import get_tokenizer

    template = cfg.prompt_template
    if cfg.adapter:
        model, tokenizer_name = load_finetuned(cfg.adapter, cfg.init_from, device)
        if template == "auto":
            template = read_adapter_config(cfg.adapter)["metadata"].get("prompt_template", "auto")
    else:
        model, tokenizer_name = load_base_model(cfg.init_from, device)
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
    from instructions import example_prompt, load_answer_file

    examples = load_answer_file(cfg.answer_file)
    out_path = cfg.answers_out or os.path.splitext(cfg.answer_file)[0] + ".answers.json"
    device = pick_device(cfg.device)
    model, tokenizer, template = load_for_answering(cfg, device)
    responses = answer_examples(model, tokenizer, examples, device, cfg.max_new_tokens, template)
    write_json_atomic([{**ex, "response": r} for ex, r in zip(examples, responses)], out_path)
    print(f"answered {len(examples)} examples from {cfg.answer_file} ({template} template); written to {out_path}")
    scored = [(ex, r) for ex, r in zip(examples, responses) if ex.get("answer") or example_prompt(ex)[1]]
    if scored:
        from instructions import score_responses

        overall, by_kind, _ = score_responses([ex for ex, _ in scored], [r for _, r in scored])
        for kind, scores in list(by_kind.items()) + [("all", overall)]:
            print(f"  {kind:14s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


def export_run(cfg):
    """--export_peft / --export_hf: write a run in Hugging Face's formats (interop.py) and exit.
    --export_peft needs --adapter; when the base is not an HF model (the tiny base, a checkpoint of this script), the
    base is written beside the adapter, in OUT_DIR/base, for PEFT to load it from. The adapter's metadata (run id,
    base, finetune, step, prompt template) travel in the safetensors header, where PEFT ignores them. --export_hf
    writes --init_from's model, with --adapter's adapter merged when given."""
    from interop import export_merged_hf, export_peft, hf_base_name

    check_inference_flags(cfg)  # --export_peft without --adapter, or mixed with --prompt / --answer_file
    if cfg.adapter:
        from lora import read_adapter_config

        model, _ = load_finetuned(cfg.adapter, cfg.init_from, "cpu")
        trained_on = read_adapter_config(cfg.adapter)["metadata"]  # load_finetuned checked it names its base
    else:
        model, _ = load_base_model(cfg.init_from, "cpu")
    if model.config.smear_keys:
        raise UserError(f"{cfg.adapter or cfg.init_from}: its base has smeared keys (the tiny base's default), which Hugging Face's GPT-2 "
                        "cannot hold; to export, pretrain a base with --no-smear_keys and fine-tune on that")
    if cfg.export_hf:
        export_merged_hf(model, cfg.export_hf)
        print(f"wrote {cfg.export_hf}: load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.export_hf!r})")
    if cfg.export_peft:
        init_from = trained_on["init_from"] if cfg.init_from == "tiny" else cfg.init_from  # as load_finetuned chose it
        base_name = hf_base_name(init_from)
        if base_name is None:  # PEFT needs an HF base: write ours (full precision; QLoRA users load it in 4 bits)
            base_name = os.path.abspath(os.path.join(cfg.export_peft, "base"))
            load_base_model(init_from, "cpu")[0].save_pretrained(base_name)
        export_peft(model, cfg.export_peft, base_model_name_or_path=base_name, metadata=trained_on)
        template = trained_on.get("prompt_template")
        print(f"wrote {cfg.export_peft}: peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base_name!r}), {cfg.export_peft!r})"
              + (f"; it was trained on prompts in the {template!r} template (instructions.format_prompt)" if template else ""))


def parse_args(argv=None):
    return parse_config(TrainConfig, argv, __doc__)


if __name__ == "__main__":
    config = parse_args()
    try:
        check_inference_flags(config)
        if config.export_peft or config.export_hf:
            export_run(config)
        elif config.prompt is not None:
            answer_prompt(config)
        elif config.answer_file:
            answer_file(config)
        else:
            train(resolve_defaults(config))
    except main_errors() as e:
        sys.exit(error_line(e))
