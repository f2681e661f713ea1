"""
One training loop for the jobs of this repository (nanoGPT's train.py is the model for it):

    python train.py                                   # LoRA instruction tuning of the tiny base (pretrained first if missing)
    python train.py --finetune full                   # full fine-tuning instead of LoRA
    python train.py --quantize nf4                    # QLoRA: LoRA on a 4-bit NF4 base
    python train.py --init_from scratch --dataset stdlib --out_dir checkpoints/tiny-base   # pretrain the tiny base
    python train.py --adapter out/instruct --prompt "Give an antonym of 'hot'."             # answer with base + adapter
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

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_BASE_DIR = os.path.join(REPO_DIR, "checkpoints", "tiny-base")


@dataclass
class TrainConfig:
    # what to start from, what to learn
    init_from: str = field(default="tiny", metadata={"help": "'tiny' (the offline base in checkpoints/tiny-base, pretrained first if missing), 'scratch', one of " + ", ".join(PRETRAINED) + ", or a checkpoint file/directory"})
    dataset: str = field(default="embedded", metadata={"help": "'stdlib' (pretraining corpus), 'embedded' (data/instructions.json), 'instruction-data' or 'alpaca' (downloaded), or a path to an Alpaca-format or chat ({'messages': [...]}) .json/.jsonl"})
    out_dir: str = field(default="out/instruct", metadata={"help": "where the log, plots, samples, summary.json and checkpoints go"})
    finetune: str = field(default="lora", metadata={"help": "'lora' (train adapters only) or 'full' (train every weight); ignored when pretraining"})
    quantize: str = field(default="none", metadata={"help": "'none' or 'nf4' (QLoRA: 4-bit NF4 base with double quantization; needs --finetune lora)"})
    # LoRA
    lora_rank: int = field(default=8, metadata={"help": "rank r of the update B @ A"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: scaling = alpha / r (alpha / sqrt(r) with --use_rslora)"})
    lora_targets: str = field(default="q,v", metadata={"help": "comma-separated layers to adapt: q, k, v, o, mlp_in, mlp_out, or all-linear"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA magnitude/direction decomposition (arXiv 2402.09353)"})
    loraplus_ratio: float = field(default=1.0, metadata={"help": "LoRA+: learning rate of B = ratio x that of A (arXiv 2402.12354 suggests 16); 1 = plain LoRA"})
    # data
    mask_prompt: bool = field(default=False, metadata={"help": "leave the prompt out of the loss (train on responses only; for chat data: on assistant turns only)"})
    pack: bool = field(default=False, metadata={"help": "pack several training examples per row up to the context (best-fit decreasing), each attending only to itself"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (over all processes under torchrun)"})
    # model shape when --init_from scratch (the tiny base: 4 layers x 256 wide, byte-level, 3.3M parameters;
    # 512 bytes of context because an Alpaca prompt alone is ~150 bytes)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 512
    dropout: float = 0.0
    # optimisation
    max_iters: int = field(default=0, metadata={"help": "optimizer steps (0 = 300 when pretraining, 200 when fine-tuning)"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = 2e-3 pretraining, 2e-3 LoRA, 3e-4 full)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate x this"})
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup steps (0 = 5% of max_iters)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay, on matrices only"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    # evaluation, logging, checkpoints
    eval_interval: int = field(default=0, metadata={"help": "evaluate and checkpoint every N steps (0 = 10 times per run)"})
    eval_batches: int = field(default=0, metadata={"help": "validation batches per evaluation (0 = the whole validation split)"})
    num_samples: int = field(default=3, metadata={"help": "held-out instructions answered before and after fine-tuning"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens generated per answer"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/ckpt.pt (same seed: same trajectory)"})
    seed: int = 1337
    # system
    device: str = field(default="auto", metadata={"help": "'auto' (cuda, then mps, then cpu), 'cuda', 'mps' or 'cpu'"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (worth it on GPU for long runs)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in backward instead of storing them (less memory, ~1 more forward)"})
    # inference only
    adapter: str = field(default="", metadata={"help": "a LoRA run's out_dir: load base + adapter (with --prompt)"})
    prompt: str = field(default="", metadata={"help": "answer this instruction with the model (and --adapter) and exit"})
    export_peft: str = field(default="", metadata={"help": "write the --adapter run's adapter in PEFT's format to this directory and exit"})
    export_hf: str = field(default="", metadata={"help": "write the model (--init_from, with the --adapter run's adapter merged) as an HF GPT-2 directory and exit"})

    @property
    def pretraining(self):
        return self.init_from == "scratch"


def resolve_defaults(cfg):
    """Fill in the settings whose sensible value depends on the job (the 0 defaults above)."""
    pre, full = cfg.pretraining, cfg.finetune == "full"
    cfg.max_iters = cfg.max_iters or (300 if pre else 200)
    cfg.learning_rate = cfg.learning_rate or (2e-3 if pre else 3e-4 if full else 2e-3)
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


# ---------------------------------------------------------------------------------------------- system helpers


def pick_device(name="auto"):
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
            json.dump(obj, f, indent=2)

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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise ValueError(f"{path} holds only LoRA adapter weights; load its base with --init_from and the adapter with --adapter {os.path.dirname(path)}")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_weights(ckpt["model"])
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
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
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

    def __init__(self, tokenizer, block_size, seed):
        from corpus import stdlib_corpus

        train_text, val_text = stdlib_corpus()
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

    def __init__(self, dataset, tokenizer, block_size, seed, mask_prompt, pack=False):
        from instructions import load_examples, split_examples, tokenize_examples

        self.train_examples, self.val_examples, self.test_examples = split_examples(load_examples(dataset))
        max_length = block_size + 1  # inputs and targets are the sequence shifted by one
        self.train, dropped = tokenize_examples(self.train_examples, tokenizer, max_length)
        self.val, dropped_val = tokenize_examples(self.val_examples, tokenizer, max_length)
        self.test, dropped_test = tokenize_examples(self.test_examples, tokenizer, max_length)
        self.dropped = dropped + dropped_val + dropped_test
        if not self.train or not self.val:
            raise ValueError(f"dataset {dataset!r} leaves no train or validation examples within {block_size} tokens")
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
    return total / max(count, 1)


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


def answer(model, tokenizer, instruction, device, max_new_tokens=80, input_text=""):
    """Greedy response to one instruction, cut at the end-of-text token."""
    from instructions import format_prompt

    return complete(model, tokenizer, format_prompt({"instruction": instruction, "input": input_text}), device, max_new_tokens)


def answer_example(model, tokenizer, example, device, max_new_tokens=80):
    """Greedy response to a held-out example: an Alpaca instruction, or a conversation's last assistant turn."""
    if "messages" not in example:
        return answer(model, tokenizer, example["instruction"], device, max_new_tokens, example.get("input", ""))
    from instructions import chat_prompt

    return complete(model, tokenizer, chat_prompt(example["messages"])[0], device, max_new_tokens)


def chat_display(example):
    """A conversation shown like an Alpaca sample: the user turn before the last assistant turn, and that turn."""
    from instructions import chat_prompt

    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "(no user turn)", "output": chat_prompt(messages)[1]}


def complete(model, tokenizer, prompt_text, device, max_new_tokens=80):
    """Greedy continuation of a prompt, cut at the end-of-text token."""
    prompt = tokenizer.encode(prompt_text)
    prompt = prompt[-(model.config.block_size - max_new_tokens) :] if len(prompt) + max_new_tokens > model.config.block_size else prompt
    was_training = model.training
    model.eval()  # greedy answers must not depend on dropout (e.g. LoRA's), or a reloaded adapter could not reproduce them
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens, temperature=0, eos_token_id=tokenizer.eot_token)
    model.train(was_training)
    new = [t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eot_token]
    return tokenizer.decode(new).strip()


# ---------------------------------------------------------------------------------------------- the loop


def prepare_model(cfg, device):
    """Build or load the model and make the chosen parameters trainable -> (model, tokenizer name, finetune label)."""
    if cfg.pretraining:
        config = GPTConfig(block_size=cfg.block_size, vocab_size=257, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
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


def train(cfg):
    """Run one job end to end; returns the summary dict that is also written to out_dir/summary.json."""
    from tokenizer import get_tokenizer

    check_config(cfg)
    device = pick_device(cfg.device)
    world = init_world(device)  # under torchrun: this process's rank among world.size (ddp.py); else rank 0 of 1
    world.micro_batches(cfg.grad_accum)  # a --grad_accum the processes cannot share fails here, before any work
    if not world.is_main:
        cfg.progress = False  # rank 0 alone reports (its stdout is the only one kept, see ddp.init_world)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, tokenizer_name, mode = prepare_model(cfg, device)
    tokenizer = get_tokenizer(tokenizer_name)
    block_size = model.config.block_size
    if cfg.pretraining:
        data = PretrainingData(tokenizer, block_size, cfg.seed)
    else:
        data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, pack=cfg.pack)
    data.grad_accum = cfg.grad_accum
    model.gradient_checkpointing = cfg.grad_checkpointing
    optimizer = make_optimizer(model, cfg)
    from lora import count_parameters

    trainable, total = count_parameters(model)
    print(f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}; {data.describe()}")

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start, rows, before = 0, [], {}
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run once without --resume first")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["trainable"] if "trainable" in ckpt else ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, rows, before = ckpt["iter"], ckpt["log"], ckpt["before"]
        print(f"resumed from {ckpt_path} at step {start}")
    run_model = world.wrap(torch.compile(model) if cfg.compile else model)
    if world.size > 1:  # each rank its own dropout masks, reproducible from (seed, rank, step resumed at)
        torch.manual_seed(cfg.seed + world.rank + 1_000_003 * start)
    val_batches = data.val_batches(cfg.batch_size)
    val_batches = val_batches[: cfg.eval_batches] if cfg.eval_batches else val_batches

    if not before and world.is_main:  # measured once, before the first step, and carried through resumes
        before["val_loss"] = evaluate(model, val_batches, device)
        if not cfg.pretraining:
            before["test_loss"] = evaluate(model, data.val_batches(cfg.batch_size, "test"), device)
            before["samples"] = [answer_example(model, tokenizer, ex, device, cfg.max_new_tokens) for ex in data.test_examples[: cfg.num_samples]]
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
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = elapsed_before + time.time() - t0
        row = {"iter": step + 1, "lr": lr, "train_loss": step_loss, "val_loss": "", "tokens": tokens_seen, "seconds": round(seconds, 3)}
        if world.is_main and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters):
            row["val_loss"] = evaluate(model, val_batches, device)
        rows.append(row)
        if cfg.progress:
            tokens_per_second = (tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
            steps.set_postfix(loss=f"{step_loss:.3f}", val=f"{row['val_loss']:.3f}" if row["val_loss"] != "" else "-", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        if row["val_loss"] != "":
            save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step + 1, rows, before, ckpt_path)
            write_log(rows, os.path.join(cfg.out_dir, "log.csv"))
            plot_losses(rows, os.path.join(cfg.out_dir, "loss.png"), f"{mode} on {cfg.dataset}")

    if not world.is_main:  # rank 0 evaluates and writes the results
        world.close()
        return None
    summary = {
        "init_from": cfg.init_from, "finetune": mode, "dataset": cfg.dataset, "lora_rank": cfg.lora_rank if mode in ("lora", "qlora") else None,
        "lora_alpha": cfg.lora_alpha if mode in ("lora", "qlora") else None, "lora_targets": cfg.lora_targets if mode in ("lora", "qlora") else None,
        "trainable_params": trainable, "total_params": total, "train_examples": len(data.train) if not cfg.pretraining else None,
        "val_loss_before": before["val_loss"], "val_loss_after": rows[-1]["val_loss"] if rows else before["val_loss"],
        "steps": cfg.max_iters, "tokens": tokens_seen, "seconds": rows[-1]["seconds"] if rows else 0.0,
        "seconds_per_step": (rows[-1]["seconds"] / len(rows)) if rows else None, "peak_memory_bytes": peak_memory_bytes(device),
        "training_state_bytes": training_state_bytes(model, optimizer), "device": device, "config": asdict(cfg),
    }
    print(f"validation loss: {summary['val_loss_before']:.4f} before -> {summary['val_loss_after']:.4f} after "
          f"{cfg.max_iters} steps in {summary['seconds']:.0f} s; peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
    if not cfg.pretraining:
        summary["test_loss_before"] = before["test_loss"]
        summary["test_loss_after"] = evaluate(model, data.val_batches(cfg.batch_size, "test"), device)
        samples = []
        for ex, response_before in zip(data.test_examples[: cfg.num_samples], before["samples"]):
            response_after = answer_example(model, tokenizer, ex, device, cfg.max_new_tokens)
            samples.append({**ex, "before": response_before, "after": response_after})
            shown = ex if "messages" not in ex else chat_display(ex)
            print(f"\n### {shown['instruction']}" + (f"\n    input:    {shown['input']}" if shown.get("input") else "")
                  + f"\n    expected: {shown['output']}\n    before:   {response_before}\n    after:    {response_after}")
        write_json_atomic(samples, os.path.join(cfg.out_dir, "samples.json"))
        print(f"\ntest loss: {summary['test_loss_before']:.4f} before -> {summary['test_loss_after']:.4f} after")
    print(f"{mode}: {trainable:,} trainable / {total:,} total parameters; outputs in {cfg.out_dir}")
    write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    world.close()
    return summary


def save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step, rows, before, path):
    """Pretraining and full fine-tuning save every weight; LoRA saves only what trained (the adapter file is the
    shareable artefact, ckpt.pt adds the optimizer state needed to resume)."""
    ckpt = {"model_config": vars(model.config).copy(), "tokenizer": tokenizer_name, "train_config": asdict(cfg), "mode": mode,
            "iter": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "log": rows, "before": before}
    if mode in ("lora", "qlora"):
        from lora import save_adapter

        ckpt["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_adapter(model, os.path.dirname(path))  # adapter_model.safetensors + adapter_config.json
    else:
        ckpt["model"] = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_atomic(ckpt, path)


def load_finetuned(adapter_dir, init_from, device):
    """The base model with a LoRA adapter from `adapter_dir` loaded into it -> (model, tokenizer name), in eval mode.
    init_from "tiny" means: the base the adapter was trained on (from its summary.json). A QLoRA adapter learned to
    correct a 4-bit base, so the base is quantized again (deterministically: the same codes as in training)."""
    from lora import load_adapter

    trained_as = None
    summary_path = os.path.join(adapter_dir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        init_from = summary["init_from"] if init_from == "tiny" else init_from
        trained_as = summary["finetune"]
    model, tokenizer_name = load_base_model(init_from, device)
    if trained_as == "qlora":
        from quantize import quantize_model

        quantize_model(model)
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer_name


def answer_prompt(cfg):
    """--prompt: load the base (and the adapter of a LoRA run) and answer one instruction."""
    from tokenizer import get_tokenizer

    device = pick_device(cfg.device)
    if cfg.adapter:
        model, tokenizer_name = load_finetuned(cfg.adapter, cfg.init_from, device)
    else:
        model, tokenizer_name = load_base_model(cfg.init_from, device)
    print(answer(model, get_tokenizer(tokenizer_name), cfg.prompt, device, cfg.max_new_tokens))


def export_run(cfg):
    """--export_peft / --export_hf: write a run in Hugging Face's formats (interop.py) and exit.
    --export_peft needs --adapter; when the base is not an HF model (the tiny base, a checkpoint of this script), the
    base is written beside the adapter, in OUT_DIR/base, for PEFT to load it from. --export_hf writes --init_from's
    model, with --adapter's adapter merged when given."""
    from interop import export_merged_hf, export_peft, hf_base_name

    if cfg.export_peft and not cfg.adapter:
        raise ValueError("--export_peft needs --adapter RUN_DIR, the out_dir of a LoRA or QLoRA run")
    if cfg.adapter:
        model, _ = load_finetuned(cfg.adapter, cfg.init_from, "cpu")
    else:
        model, _ = load_base_model(cfg.init_from, "cpu")
    if cfg.export_hf:
        export_merged_hf(model, cfg.export_hf)
        print(f"wrote {cfg.export_hf}: load it with transformers.GPT2LMHeadModel.from_pretrained({cfg.export_hf!r})")
    if cfg.export_peft:
        init_from = cfg.init_from
        summary_path = os.path.join(cfg.adapter, "summary.json")
        if init_from == "tiny" and os.path.isfile(summary_path):
            with open(summary_path) as f:
                init_from = json.load(f)["init_from"]
        base_name = hf_base_name(init_from)
        if base_name is None:  # PEFT needs an HF base: write ours (full precision; QLoRA users load it in 4 bits)
            base_name = os.path.abspath(os.path.join(cfg.export_peft, "base"))
            load_base_model(init_from, "cpu")[0].save_pretrained(base_name)
        export_peft(model, cfg.export_peft, base_model_name_or_path=base_name)
        print(f"wrote {cfg.export_peft}: peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base_name!r}), {cfg.export_peft!r})")


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
        if config.export_peft or config.export_hf:
            export_run(config)
        elif config.prompt:
            answer_prompt(config)
        else:
            train(resolve_defaults(config))
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
