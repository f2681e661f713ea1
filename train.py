"""
One training loop for the jobs of this repository (nanoGPT's train.py is the model for it):

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

import argparse
import csv
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from ddp import init_world
from lora import atomic_write
from model import GPT, PRETRAINED, GPTConfig
from safety import (UserError, check_finite_settings, check_optimizer_ranges, error_line, load_tensor_file, lock_out_dir, main_errors, new_run_id,
                    read_json)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_BASE_DIR = os.path.join(REPO_DIR, "checkpoints", "tiny-base")


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


def check_config(cfg):
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

        resolve_targets(tuple(t.strip() for t in cfg.lora_targets.split(",")))  # names the first unknown target
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


# ---------------------------------------------------------------------------------------------- system helpers


def pick_device(name="auto"):
    if name not in ("auto", "cuda", "mps", "cpu") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name!r}: use auto, cuda (or cuda:N), mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: this PyTorch sees no Apple GPU (torch.backends.mps.is_available() is False); use --device cpu or auto")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device):
    """bf16 autocast on CUDA GPUs that support it (weights and optimizer stay fp32); plain fp32 elsewhere."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the process's peak resident set size (VmHWM)


def peak_memory_bytes(device):
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set size (which includes Python and
    PyTorch themselves, a few hundred MB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json_atomic(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            try:  # a bare NaN or Infinity is not JSON: refuse to write a file that JSON readers would reject
                json.dump(obj, f, indent=2, allow_nan=False)
            except ValueError as e:
                raise ValueError(f"not writing {path}: {e} (a NaN or infinite number)") from None

    atomic_write(path, write)


def write_csv_atomic(rows, path, fieldnames):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def save_figure_atomic(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# ---------------------------------------------------------------------------------------------- models


def load_checkpoint_model(path, device="cpu"):
    """A full-weight checkpoint written by this script -> (GPT, tokenizer name)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    ckpt = load_tensor_file(path, fix="point --init_from at a checkpoint written by train.py")
    if "model" not in ckpt and "trainable" in ckpt:
        raise ValueError(f"{path} holds only LoRA adapter weights; load its base with --init_from and the adapter with --adapter {os.path.dirname(path)}")
    for key in ("model", "model_config", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"{path} has no {key!r}: it is not a checkpoint written by train.py")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_weights(ckpt["model"])
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} holds NaN or infinite values; the training that saved it diverged")
    return model.to(device), ckpt["tokenizer"]


def ensure_tiny_base(device="cpu"):
    """The default starting point: pretrain the tiny base on the stdlib corpus if it is not there yet, and finish
    it if an earlier pretraining was interrupted (its checkpoint is then from before the last step)."""
    path = os.path.join(TINY_BASE_DIR, "ckpt.pt")
    base_config = TrainConfig(init_from="scratch", dataset="stdlib", out_dir=TINY_BASE_DIR, device=device)
    if not os.path.isfile(path) and "RANK" in os.environ:  # every torchrun process would pretrain (and write) it at once
        raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first in one process (python train.py --init_from scratch "
                                f"--dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}), then start torchrun")
    if not os.path.isfile(path):
        print(f"No tiny base model at {path}: pretraining it first on the standard library's docstrings "
              f"(a few minutes on a laptop CPU; `python train.py --init_from scratch --dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}` does the same).")
        train(resolve_defaults(base_config))
    else:
        ckpt = load_tensor_file(path, fix=f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        if "iter" not in ckpt or "max_iters" not in ckpt.get("train_config", {}):
            raise UserError(f"{path} records no training progress (iter, train_config): it is not a checkpoint of train.py; "
                            f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        done, planned = ckpt["iter"], ckpt["train_config"]["max_iters"]
        if done < planned:
            print(f"The tiny base at {path} stopped at step {done} of {planned}: resuming its pretraining first.")
            base_config = TrainConfig(**{**ckpt["train_config"], "resume": True, "device": device, "out_dir": TINY_BASE_DIR})
            train(resolve_defaults(base_config))
    return path


def load_base_model(init_from, device="cpu"):
    """'tiny' | a GPT-2 name or HF directory | a checkpoint of this script -> (GPT, tokenizer name)."""
    if init_from == "tiny":
        return load_checkpoint_model(ensure_tiny_base(device), device)
    if init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "model.safetensors")):
        return GPT.from_pretrained(init_from).to(device), "gpt2"
    if os.path.exists(init_from):
        return load_checkpoint_model(init_from, device)
    raise ValueError(f"--init_from {init_from!r}: use 'tiny', 'scratch', one of {', '.join(PRETRAINED)}, or an existing checkpoint path")


# ---------------------------------------------------------------------------------------------- data


class PretrainingData:
    """The stdlib corpus as one long token stream. A training batch is batch_size random windows whose positions
    depend only on (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, tokenizer, block_size, seed, sources="docstrings"):
        from corpus import stdlib_corpus

        train_text, val_text = stdlib_corpus(sources)
        self.train = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
        self.val = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
        self.block_size, self.seed = block_size, seed
        n = (len(self.val) - 1) // block_size  # validation: every non-overlapping window, the same each time
        self.val_windows = self.val[: n * block_size + 1]

    def train_batch(self, step, micro, batch_size):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        starts = torch.randint(len(self.train) - self.block_size - 1, (batch_size,), generator=g)
        x = torch.stack([self.train[s : s + self.block_size] for s in starts])
        y = torch.stack([self.train[s + 1 : s + 1 + self.block_size] for s in starts])
        return x, y

    def val_batches(self, batch_size):
        n = (len(self.val_windows) - 1) // self.block_size
        x = self.val_windows[:-1].view(n, self.block_size)
        y = self.val_windows[1:].view(n, self.block_size)
        return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]

    def describe(self):
        return f"stdlib corpus: {len(self.train):,} train and {len(self.val):,} validation bytes"


class InstructionData:
    """Alpaca-format examples or chat conversations, split 85/5/10, tokenized, each epoch shuffled by (seed, epoch).
    With pack, the training examples are packed once into rows of up to block_size positions (best-fit decreasing)
    and the rows are shuffled instead; validation and test batches stay unpacked (the loss is the same either way)."""

    def __init__(self, dataset, tokenizer, block_size, seed, mask_prompt, template="alpaca", pack=False):
        from instructions import load_examples, split_examples, tokenize_examples

        self.train_examples, self.val_examples, self.test_examples = split_examples(load_examples(dataset))
        sizes = [len(self.train_examples), len(self.val_examples), len(self.test_examples)]
        if not all(sizes):
            raise UserError(f"dataset {dataset!r} has {sum(sizes)} examples, which the 85/5/10 split cuts into {sizes[0]} train / "
                            f"{sizes[1]} validation / {sizes[2]} test; every split needs one or more, so use at least 20 examples")
        max_length = block_size + 1  # inputs and targets are the sequence shifted by one
        self.train, dropped = tokenize_examples(self.train_examples, tokenizer, max_length, template)
        self.val, dropped_val = tokenize_examples(self.val_examples, tokenizer, max_length, template)
        self.test, dropped_test = tokenize_examples(self.test_examples, tokenizer, max_length, template)
        self.dropped = dropped + dropped_val + dropped_test
        for split, kept, examples in (("train", self.train, self.train_examples), ("validation", self.val, self.val_examples), ("test", self.test, self.test_examples)):
            if not kept:  # an empty split would train on nothing or report a loss of 0
                raise UserError(f"dataset {dataset!r}: all {len(examples)} {split} examples are longer than the model's context of "
                                f"{block_size} tokens; use shorter examples or a base with a longer block_size")
        self.pad, self.seed, self.mask_prompt = tokenizer.eot_token, seed, mask_prompt
        self.packed, self.block_size = None, block_size
        if pack:
            from instructions import pack_examples

            self.packed = pack_examples(self.train, block_size)

    def train_batch(self, step, micro, batch_size):
        """(inputs, targets) of one micro-batch; with packing also segment_ids (see GPT.hidden_states)."""
        from instructions import collate, collate_packed

        units = self.train if self.packed is None else self.packed  # examples, or rows of packed examples
        index = (step * self.grad_accum + micro) * batch_size  # position in the endless stream of epochs
        rows = []
        for i in range(index, index + batch_size):
            epoch, offset = divmod(i, len(units))
            order = torch.randperm(len(units), generator=torch.Generator().manual_seed(self.seed + epoch))
            rows.append(units[order[offset]])
        if self.packed is not None:
            return collate_packed(rows, self.pad, self.mask_prompt)
        return collate(rows, self.pad, self.mask_prompt)

    def val_batches(self, batch_size, split="val"):
        from instructions import collate

        rows = self.val if split == "val" else self.test
        return [collate(rows[i : i + batch_size], self.pad, self.mask_prompt) for i in range(0, len(rows), batch_size)]

    def describe(self):
        packed = ""
        if self.packed is not None:
            positions = sum(len(ids) - 1 for ids, _ in self.train)
            packed = f"; packed into {len(self.packed)} rows ({positions / (len(self.packed) * self.block_size):.0%} full)"
        return (f"{len(self.train)} train / {len(self.val)} validation / {len(self.test)} test examples"
                + (f" ({self.dropped} longer than the block size dropped)" if self.dropped else "") + packed)


@torch.no_grad()
def evaluate(model, batches, device):
    """Mean cross-entropy per target token over all batches (in nats; per byte for the byte tokenizer)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device):
            logits, _ = model(x)
        n = (y != -100).sum().item()
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + n
    model.train()
    if count == 0:
        raise ValueError("no target tokens to evaluate on: an empty split, or every target masked")
    return total / count


# ---------------------------------------------------------------------------------------------- optimisation


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters. Matrices (dim >= 2) get weight decay; biases and LayerNorm gains do not
    (decaying them only fights the normalisation). With --loraplus_ratio, LoRA's B matrices get a higher rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.loraplus_ratio != 1.0:
        from lora import lora_param_groups

        groups = lora_param_groups(model, cfg.learning_rate, loraplus_lr_ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay)
    else:
        groups = [
            {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
    for g in groups:
        g["lr_scale"] = g.get("lr", cfg.learning_rate) / cfg.learning_rate
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio x peak (as in GPT-3 / nanoGPT)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def training_state_bytes(model, optimizer):
    """Bytes of trainable parameters' gradients and optimizer state plus all weights: what training must hold."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return weights + grads + states


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


def write_log(rows, path):
    write_csv_atomic(rows, path, ["iter", "lr", "train_loss", "val_loss", "tokens", "seconds"])


def resolve_template(template, tokenizer_name):
    """--prompt_template auto: the compact template for the byte-level base, Alpaca's for GPT-2's tokenizer."""
    if template == "auto":
        return "compact" if tokenizer_name == "bytes" else "alpaca"
    return template


def answer_examples(model, tokenizer, examples, device, max_new_tokens=80, template="alpaca", batch_size=64):
    """Greedy responses to a list of examples, each cut at the end-of-text token: Alpaca {"instruction", "input"}
    examples prompted in `template`, conversations ({"messages": [...]}) answered at their last assistant turn in
    instructions.CHAT_TEMPLATE (instructions.example_prompt). Batched by complete_prompts."""
    from instructions import example_prompt

    return complete_prompts(model, tokenizer, [example_prompt(ex, template)[0] for ex in examples], device, max_new_tokens, batch_size)


def complete_prompts(model, tokenizer, prompt_texts, device, max_new_tokens=80, batch_size=64):
    """Greedy continuations of prompt texts, each cut at the end-of-text token. Prompts of equal length share a
    batch, so no row needs padding and each row gets exactly the tokens it would get alone."""
    check_max_new_tokens(max_new_tokens, model.config.block_size)
    keep = model.config.block_size - max_new_tokens  # room for the answer; a longer prompt keeps its end
    prompts = [tokenizer.encode(text)[-keep:] for text in prompt_texts]
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    responses = [""] * len(prompts)
    was_training = model.training
    model.eval()  # greedy answers must not depend on dropout (e.g. LoRA's), or a reloaded adapter could not reproduce them
    for length, rows in by_length.items():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            out = model.generate(torch.tensor([prompts[i] for i in batch], device=device), max_new_tokens, temperature=0, eos_token_id=tokenizer.eot_token)
            for i, tokens in zip(batch, out[:, length:].tolist()):
                tokens = tokens[: tokens.index(tokenizer.eot_token)] if tokenizer.eot_token in tokens else tokens
                responses[i] = tokenizer.decode(tokens).strip()
    model.train(was_training)
    return responses


def complete(model, tokenizer, prompt_text, device, max_new_tokens=80):
    """Greedy continuation of one prompt text (already in its template: format_prompt's, chat_prompt's, or none),
    cut at the end-of-text token."""
    return complete_prompts(model, tokenizer, [prompt_text], device, max_new_tokens)[0]


def chat_display(example):
    """A conversation shown like an Alpaca sample: the user turn before the last assistant turn, and that turn."""
    from instructions import chat_prompt

    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "(no user turn)", "output": chat_prompt(messages)[1]}


def answer(model, tokenizer, instruction, device, max_new_tokens=80, input_text="", template="alpaca"):
    """Greedy response to one instruction, cut at the end-of-text token."""
    return answer_examples(model, tokenizer, [{"instruction": instruction, "input": input_text}], device, max_new_tokens, template)[0]


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
        from quantize import quantize_model

        quantize_model(model)
    from lora import apply_lora

    targets = tuple(t.strip() for t in cfg.lora_targets.split(","))
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets, dropout=cfg.lora_dropout,
               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    return model, tokenizer_name, "qlora" if cfg.quantize == "nf4" else "lora"


def check_max_new_tokens(max_new_tokens, block_size):
    if not 1 <= max_new_tokens < block_size:
        raise UserError(f"--max_new_tokens {max_new_tokens}: the model sees {block_size} tokens at a time and the prompt needs "
                        f"some of them, so use 1 to {block_size - 1}")


def clip_gradients(model, max_norm):
    """Scale the trainable parameters' gradients to a global norm of at most max_norm (0 = no clipping); returns the
    norm before clipping, which the loop checks for NaN and infinity."""
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm = inf only measures: the scale factor min(1, inf / norm) is exactly 1
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))


def check_finite(step, what, values, rows, cfg):
    """Stop the run at the first NaN or infinity, before it reaches the weights or any saved file: out_dir keeps the
    checkpoint and adapter of the last good evaluation, from which --resume can go on (with other settings)."""
    if all(math.isfinite(v) for v in values):
        return
    saved = [r["iter"] for r in rows if r["val_loss"] != ""]
    kept = f"{cfg.out_dir} keeps the checkpoint of step {saved[-1]}" if saved else "nothing of this run was saved"
    raise UserError(f"step {step}: {what}: training diverged, so it stops here and {kept}; "
                    f"try a lower --learning_rate (this run: {cfg.learning_rate:g}) or --grad_clip")


RUN_FILES = ("ckpt.pt", "adapter_model.safetensors", "adapter_config.json", "log.csv", "loss.png", "samples.json", "summary.json")


def remove_earlier_run(out_dir):
    """A fresh run replaces whatever an earlier run left in out_dir, at its start: otherwise the earlier run's
    summary or checkpoint would sit beside this run's files until it overwrote them (or forever, if killed)."""
    earlier = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if earlier:
        print(f"{out_dir} holds an earlier run ({', '.join(earlier)}): replacing it (--resume continues it instead)")
        for name in earlier:
            os.remove(os.path.join(out_dir, name))


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


def train(cfg):
    """Run one job end to end; returns the summary dict that is also written to out_dir/summary.json. The run owns
    out_dir while it lasts: a second run on the same folder is refused (safety.lock_out_dir). Under torchrun, rank 0
    alone writes to out_dir, so it holds the lock for all ranks, and the other ranks return None."""
    check_config(cfg)
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
        data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, template, pack=cfg.pack)
        answered = data.test_examples[: cfg.answer_limit]  # Alpaca examples, or conversations (answered at their last assistant turn)
    data.grad_accum = cfg.grad_accum
    model.gradient_checkpointing = cfg.grad_checkpointing
    optimizer = make_optimizer(model, cfg)
    from lora import count_parameters

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
        remove_earlier_run(cfg.out_dir)
    run_model = world.wrap(torch.compile(model) if cfg.compile else model)
    if world.size > 1:  # each rank its own dropout masks, reproducible from (seed, rank, step resumed at)
        torch.manual_seed(cfg.seed + world.rank + 1_000_003 * start)
    val_batches = data.val_batches(cfg.batch_size)
    val_batches = val_batches[: cfg.eval_batches] if cfg.eval_batches else val_batches

    if not before and world.is_main:  # measured once, before the first step, and carried through resumes
        before["val_loss"] = evaluate(model, val_batches, device)
        if not cfg.pretraining:
            before["test_loss"] = evaluate(model, data.val_batches(cfg.batch_size, "test"), device)
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
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
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
        check_finite(step + 1, f"the training loss is {step_loss:g} and the gradient norm {grad_norm:g}", [step_loss, grad_norm], rows, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = elapsed_before + time.time() - t0
        row = {"iter": step + 1, "lr": lr, "train_loss": step_loss, "val_loss": "", "tokens": tokens_seen, "seconds": round(seconds, 3)}
        if world.is_main and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters):
            row["val_loss"] = evaluate(model, val_batches, device)
            check_finite(step + 1, f"the validation loss is {row['val_loss']:g}", [row["val_loss"]], rows, cfg)
        rows.append(row)
        if cfg.progress:
            tokens_per_second = (tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
            steps.set_postfix(loss=f"{step_loss:.3f}", val=f"{row['val_loss']:.3f}" if row["val_loss"] != "" else "-", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        if row["val_loss"] != "":
            save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step + 1, rows, before, ckpt_path, run_id)
            write_log(rows, os.path.join(cfg.out_dir, "log.csv"))
            plot_losses(rows, os.path.join(cfg.out_dir, "loss.png"), f"{mode} on {cfg.dataset}")

    if not world.is_main:  # rank 0 evaluates and writes the results
        return None
    summary = {
        "init_from": cfg.init_from, "finetune": mode, "dataset": cfg.dataset, "lora_rank": cfg.lora_rank if mode in ("lora", "qlora") else None,
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
        summary["test_loss_after"] = evaluate(model, data.val_batches(cfg.batch_size, "test"), device)
        check_finite(cfg.max_iters, f"the test loss is {summary['test_loss_after']:g}", [summary["test_loss_after"]], rows, cfg)
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


def load_finetuned(adapter_dir, init_from, device):
    """The base model with a LoRA adapter from `adapter_dir` loaded into it -> (model, tokenizer name), in eval mode.
    init_from "tiny" means: the base the adapter was trained on (recorded in its adapter_config.json). A QLoRA adapter
    learned to correct a 4-bit base, so the base is quantized again (deterministically: the same codes as in training)."""
    from lora import load_adapter, read_adapter_config

    config = read_adapter_config(adapter_dir)
    trained_on = config["metadata"]  # written by save_checkpoint: run_id, init_from, finetune, step
    if not {"run_id", "init_from", "finetune"} <= set(trained_on):
        raise UserError(f"{adapter_dir}/adapter_config.json does not say which base it was trained on (no run_id, init_from and "
                        f"finetune in its metadata): it was not saved by train.py; load it with lora.load_adapter")
    summary_path = os.path.join(adapter_dir, "summary.json")
    if os.path.isfile(summary_path):  # the folder's summary must describe this adapter's run, not another one
        summary = read_json(summary_path, ["run_id"], what="summary of a train.py run")
        if summary["run_id"] != trained_on["run_id"]:
            raise UserError(f"{summary_path} is from run {summary['run_id']} but the adapter in {adapter_dir} from run "
                            f"{trained_on['run_id']}: the folder mixes two runs' files; train again in an empty --out_dir")
    init_from = trained_on["init_from"] if init_from == "tiny" else init_from
    model, tokenizer_name = load_base_model(init_from, device)
    if trained_on["finetune"] == "qlora":
        from quantize import quantize_model

        quantize_model(model)
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer_name


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


def parse_config(config_class, argv=None, description=__doc__):
    """Every field of a config dataclass becomes a --flag with its default in --help; unknown flags are errors.
    (finetune_classifier.py builds its command line from ClassifierConfig the same way.)"""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_class):
        help_text = (f.metadata.get("help", "") + f" (default: {f.default})").replace("%", "%%")  # argparse formats help with %
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    return config_class(**vars(parser.parse_args(argv)))


def parse_args(argv=None):
    return parse_config(TrainConfig, argv)


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
