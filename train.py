"""
Train a GPT: pretrain the tiny base from scratch, or fine-tune a base on instructions (full, LoRA or QLoRA). Like
nanoGPT's train.py it reads in the order it runs: configuration, model, data, the loop, save. What is not the lesson
(checks of the settings, the data files, --resume, reports) is in support/; chat.py answers with a trained run and
`python -m support.export` writes it in Hugging Face's formats.

    python train.py                                # LoRA instruction tuning of the tiny base (pretrained if missing)
    python train.py --finetune full                # every weight trains instead
    python train.py --quantize nf4                 # QLoRA: LoRA on a 4-bit NF4 base
    python train.py --init_from scratch --dataset stdlib --out_dir checkpoints/tiny-base   # pretrain the tiny base
    torchrun --nproc_per_node=4 train.py --init_from gpt2 --dataset instruction-data --grad_accum 8   # data-parallel

Data parallelism is nanoGPT's: torchrun starts one process per GPU (or CPU worker) and tells each its RANK,
LOCAL_RANK and WORLD_SIZE; each holds the whole model, and DistributedDataParallel averages the gradients during
backward (NCCL on CUDA, Gloo on the CPU). --grad_accum counts the micro-batches of a step over all processes: rank r
computes micro-batches r, r + N, ... of the N processes, so one process with the same flags follows the same
trajectory (up to the order of float sums). Evaluation is shared the same way; rank 0 alone prints and writes, and
every rank reads ckpt.pt on --resume (on several machines out_dir must be on a file system they share).
"""

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lora import apply_lora
from model import GPT, PRETRAINED, GPTConfig, count_parameters
from quantize import quantize_model
from support import checkpoints, cli, optim, resume, runs
from support.answers import answer_examples
from support.fast_dequantize import use_fast_dequantize
from support.reports import report_run


@dataclass
class TrainConfig:
    # the job: what to start from, what to learn, where the results go
    init_from: str = "tiny"  # 'tiny' (checkpoints/tiny-base, pretrained first if missing), 'scratch' (pretrain a
    #   new model), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, an HF GPT-2 directory, or the
    #   out_dir of a pretraining or full fine-tuning run
    dataset: str = "embedded"  # 'embedded' (data/instructions.json), 'instruction-data' or 'alpaca' (downloaded), an
    #   Alpaca or chat .json/.jsonl file, or 'stdlib' to pretrain (--data_path: the same)
    out_dir: str = "out/instruct"  # where the log, plots, samples, summary.json and checkpoints go
    finetune: Literal["lora", "full"] = "lora"  # train adapters only, or every weight
    quantize: Literal["none", "nf4"] = "none"  # nf4: QLoRA, the frozen base in 4-bit NF4 with double quantization
    dequantize: Literal["reference", "table", "kernel"] = "reference"  # --quantize nf4: a faster way to the same values
    # LoRA (--finetune lora; on a 4-bit base with --quantize nf4)
    lora_rank: int = 32  # rank r of each update B @ A
    lora_alpha: float = 0.0  # scaling = alpha / r (alpha / sqrt(r) with --use_rslora); default (0): 2 x rank, so
    #   alpha / r = 2 at every rank (finetune_classifier.py does the same)
    lora_targets: str = "all-linear"  # comma-separated layers to adapt: q, k, v, o, mlp_in, mlp_out, or all-linear
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732)
    use_dora: bool = False  # DoRA: magnitude and direction learned apart (arXiv 2402.09353)
    loraplus_ratio: float = 1.0  # LoRA+: B learns at this many times A's rate (arXiv 2402.12354 suggests 16)
    # data
    mask_prompt: bool = True  # learn the responses only (chat data: the assistant turns)
    prompt_template: Literal["auto", "alpaca", "compact", "bare"] = "auto"  # auto: bare for bytes, alpaca for GPT-2
    pack: bool = False  # pack several examples per row up to the context, each attending only to itself
    group_by_length: bool = True  # batches of examples of about one length: less padding (without --pack)
    batch_size: int = 0  # sequences per micro-batch; default (0): 8 fine-tuning the tiny base, else 16
    grad_accum: int = 1  # micro-batches per optimizer step (over all processes under torchrun)
    # pretraining only (--init_from scratch --dataset stdlib): the text and the model's shape
    # The tiny base: small on purpose, so that five CPU minutes take it past predicting letters by frequency.
    # Fine-tuning keeps the shape of its base.
    corpus: str = "docstrings"  # pretraining text, comma-separated: docstrings, comments, topics, code, instructions
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 256  # context length in tokens (bytes for the tiny base)
    dropout: float = 0.0  # dropout in the blocks (the adapters' is --lora_dropout)
    smear_keys: bool = True  # each key also carries its predecessor, so a small model learns to copy (model.py)
    # optimisation
    max_iters: int = 0  # optimizer steps; default (0): 1,000 pretraining, 4,200 fine-tuning the tiny base, 200 GPT-2
    learning_rate: float = 0.0  # peak rate; default (0): 4e-3 pretraining, 3e-3 LoRA, and for --finetune full 2e-3
    #   (the tiny base) or 3e-4 (GPT-2)
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate x this
    warmup_iters: int = 0  # linear warmup steps; default (0): 5% of max_iters
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW's decay rate of the gradient's running mean
    beta2: float = 0.95  # AdamW's decay rate of the squared gradient's running mean
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    seed: int = 1337  # seed of the initialisation, the batches and dropout
    # evaluation and output
    eval_interval: int = 0  # evaluate and save every N steps; default (0): 10 times per run (max_iters / 10)
    eval_batches: int = 0  # validation batches per evaluation; default (0): the whole validation split
    num_samples: int = 3  # held-out answers printed before and after fine-tuning
    answer_limit: int = 500  # test examples answered and scored before and after fine-tuning (the first N)
    max_new_tokens: int = 80  # tokens generated per answer
    resume: bool = False  # continue from out_dir/ckpt.pt (the same settings: the same trajectory)
    # runtime
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda' (or cuda:N), 'mps' or 'cpu'
    compile: bool = False  # torch.compile the model (worth it on a GPU for long runs)
    progress: bool = True  # show a progress bar
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~1 more forward

    @property
    def pretraining(self):
        return self.init_from == "scratch"


def resolve_defaults(cfg):
    """Fill in the settings whose sensible value depends on the job (the 0 defaults above). A model that read GPT-2's
    weights needs gentler full fine-tuning and fewer steps than the tiny base, which starts far from done."""
    pre, full = cfg.pretraining, cfg.finetune == "full"
    gpt2 = cfg.init_from in PRETRAINED or os.path.isfile(os.path.join(cfg.init_from, "model.safetensors"))
    cfg.max_iters = cfg.max_iters or (1000 if pre else 200 if gpt2 else 4200)  # 200 x 16: ~3 epochs of instruction-data
    # the tiny base learns more per second from many small steps (docs/results.md)
    cfg.batch_size = cfg.batch_size or (16 if pre or gpt2 else 8)
    cfg.learning_rate = cfg.learning_rate or (4e-3 if pre else (3e-4 if gpt2 else 2e-3) if full else 3e-3)
    cfg.warmup_iters = cfg.warmup_iters or max(1, cfg.max_iters // 20)
    cfg.eval_interval = cfg.eval_interval or max(1, cfg.max_iters // 10)
    return cfg


def prepare_model(cfg, device):
    """Build or load the model and make the chosen parameters trainable -> (model, tokenizer name, mode, fingerprint
    of the base's weights: what a LoRA adapter records, so that it loads on no other base; None for the other modes)."""
    if cfg.pretraining:  # a byte-level GPT of the configured shape, from random weights
        config = GPTConfig(
            block_size=cfg.block_size,
            vocab_size=257,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=cfg.dropout,
            smear_keys=cfg.smear_keys,
        )
        return GPT(config).to(device), "bytes", "pretrain", None
    model, tokenizer_name = checkpoints.load_base_model(cfg.init_from, device, progress=cfg.progress)
    if cfg.finetune == "full":
        return model, tokenizer_name, "full", None
    base_sha256 = checkpoints.weights_sha256(model)  # of the base as loaded, before quantizing and adapting it
    if cfg.quantize == "nf4":
        quantize_model(model)  # QLoRA: every linear layer but the tied output head to 4-bit NF4, frozen
        use_fast_dequantize(model, cfg.dequantize)
    apply_lora(
        model,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha or None,
        targets=cfg.lora_targets,
        dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )  # freezes everything but the new adapters
    return model, tokenizer_name, "qlora" if cfg.quantize == "nf4" else "lora", base_sha256


def run_training(cfg, device, rank=0, world_size=1):
    """One job end to end, as process `rank` of `world_size` (torchrun); returns the summary, also written to
    out_dir/summary.json (None on the ranks other than 0, which write nothing)."""
    ddp, master = world_size > 1, rank == 0
    torch.manual_seed(cfg.seed)
    model, tokenizer_name, mode, base_sha256 = prepare_model(cfg, device)
    data, tokenizer, template = checkpoints.load_data(cfg, tokenizer_name, model.config.block_size)
    answered = [] if cfg.pretraining else data.test_examples[: cfg.answer_limit]  # scored before and after
    val_batches = data.val_batches(cfg.batch_size)[: cfg.eval_batches or None]
    test_batches = [] if cfg.pretraining else data.val_batches(cfg.batch_size, "test")
    model.gradient_checkpointing = cfg.grad_checkpointing
    betas = (cfg.beta1, cfg.beta2)
    optimizer = optim.make_optimizer(model, cfg.learning_rate, cfg.weight_decay, betas, cfg.loraplus_ratio)
    trainable, total = count_parameters(model)
    print(
        f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}; "
        f"{data.describe()}"
    )

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    # --resume: the checkpoint's trained tensors, optimizer state, random state and log; else a fresh run
    start, rows, before, run_id = resume.start_run(ckpt_path, cfg, model, optimizer, device, writes=master)
    if not before:  # measured once, before the first step, and carried through resumes; each rank scores its share
        before["val_loss"] = mean_token_loss(model, val_batches, device, rank, world_size)
        if not cfg.pretraining:
            before["test_loss"] = mean_token_loss(model, test_batches, device, rank, world_size)
            before["answers"] = shared_answers(model, tokenizer, answered, device, cfg, template, rank, world_size)
        print(f"validation loss before training: {before['val_loss']:.4f}")
    train_model = torch.compile(model) if cfg.compile else model
    if ddp:  # and each rank its own dropout masks, reproducible from (seed, rank, step resumed at)
        train_model = DDP(train_model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
        torch.manual_seed(cfg.seed + rank + 1_000_003 * start)

    runs.reset_peak_memory(device)
    t0, (tokens_seen, seconds_before) = time.time(), (rows[-1]["tokens"], rows[-1]["seconds"]) if rows else (0, 0.0)
    model.train()
    steps = tqdm(range(start, cfg.max_iters), mode, initial=start, total=cfg.max_iters, disable=not cfg.progress)
    for step in steps:
        lr = optim.lr_at_step(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
        optim.set_learning_rate(optimizer, lr)
        step_loss, step_tokens = 0.0, 0
        micro_batches = range(rank, cfg.grad_accum, world_size)  # all of them for one process
        for micro in micro_batches:
            x, y, *segments = data.train_batch(step, micro, cfg.batch_size)  # segment ids only with --pack
            x, y, segment_ids = x.to(device), y.to(device), segments[0].to(device) if segments else None
            if ddp:  # all-reduce the gradients only in the backward of the rank's last micro-batch of the step
                train_model.require_backward_grad_sync = micro == micro_batches[-1]
            with runs.autocast_context(device):
                _, loss = train_model(x, y, segment_ids=segment_ids)
            #   x world_size: DDP averages the ranks' gradients; the step's gradient is the micro-batches' mean
            (loss * world_size / cfg.grad_accum).backward()
            step_loss, step_tokens = step_loss + loss.item() / cfg.grad_accum, step_tokens + x.numel()
        if ddp:  # the step's loss and tokens over all ranks
            totals = torch.tensor([step_loss, step_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            step_loss, step_tokens = totals.tolist()
        tokens_seen += int(step_tokens)
        grad_norm = optim.clip_gradients(model, cfg.grad_clip)  # of the gradients all ranks share after the all-reduce
        resume.stop_if_diverged(step + 1, rows, cfg, training_loss=step_loss, gradient_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {
            "iter": step + 1,
            "lr": lr,
            "train_loss": step_loss,
            "val_loss": "",
            "tokens": tokens_seen,
            "seconds": round(seconds_before + time.time() - t0, 3),
        }
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters:  # every rank evaluates its share
            row["val_loss"] = mean_token_loss(model, val_batches, device, rank, world_size)
            resume.stop_if_diverged(step + 1, rows, cfg, validation_loss=row["val_loss"])
        rows.append(row)
        steps.set_postfix(loss=step_loss, val=row["val_loss"] or "-", refresh=False)
        if row["val_loss"] != "" and master:  # every evaluation ends with a save, by rank 0
            resume.save_checkpoint(
                model, optimizer, cfg, tokenizer_name, mode, step + 1, rows, before, ckpt_path, run_id, base_sha256
            )

    after = {}  # the last evaluation is shared by the ranks too; rank 0 writes the results (the others return None)
    if not cfg.pretraining:
        after["test_loss"] = mean_token_loss(model, test_batches, device, rank, world_size)
        resume.stop_if_diverged(cfg.max_iters, rows, cfg, test_loss=after["test_loss"])
        after["answers"] = shared_answers(model, tokenizer, answered, device, cfg, template, rank, world_size)
    if not master:
        return None
    return report_run(cfg, model, optimizer, mode, data, template, answered, before, after, rows, device, run_id)


@torch.no_grad()
def mean_token_loss(model, batches, device, rank=0, world_size=1):
    """Mean cross-entropy per target token of a language model over (inputs, targets) batches, targets -100 left out
    (in nats; per byte for the byte tokenizer): nanoGPT's estimate_loss. Under torchrun each rank scores batches rank,
    rank + world_size, ... and the sums are added up over the ranks, so no rank waits in a collective while another
    evaluates alone (a wait longer than the process group's timeout would end the run). The model is put back in
    training mode afterwards."""
    model.eval()
    loss_sum, count = 0.0, 0
    for x, y in batches[rank::world_size]:
        with runs.autocast_context(device):
            _, loss = model(x.to(device), y.to(device))
        targets = int((y != -100).sum())
        if targets:  # a batch without targets has a NaN mean and adds nothing
            loss_sum, count = loss_sum + loss.item() * targets, count + targets
    if world_size > 1:
        totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, count = totals.tolist()
    model.train()
    if count == 0:
        raise ValueError("no target tokens to evaluate on: an empty split, or every target masked")
    return loss_sum / count


def shared_answers(model, tokenizer, examples, device, cfg, template, rank=0, world_size=1):
    """Greedy answers to the examples (answer_examples), each rank answering examples rank, rank +
    world_size, ...; every rank gets all the answers, in order (a greedy answer does not depend on its batch)."""
    mine = answer_examples(model, tokenizer, examples[rank::world_size], device, cfg.max_new_tokens, template)
    if world_size == 1:
        return mine
    shares = [None] * world_size
    dist.all_gather_object(shares, mine)
    return [shares[i % world_size][i // world_size] for i in range(len(examples))]


def train(cfg):
    """Run one job; returns its summary. Settings left at 0 get the job's default first (resolve_defaults). The run
    owns out_dir while it lasts: a second run on the same folder is refused (runs.lock_out_dir). Under torchrun
    rank 0 alone writes to out_dir, so it holds the lock for all ranks."""
    resolve_defaults(cfg)
    device = runs.pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    ddp = "RANK" in os.environ  # started by torchrun
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    cli.check_train_config(cfg, device, world_size)
    if ddp:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this process's GPU
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if rank != 0:  # one voice: the other ranks' prints would repeat rank 0's (errors still reach stderr)
            sys.stdout, cfg.progress = open(os.devnull, "w"), False
    try:
        with runs.lock_out_dir(cfg.out_dir) if rank == 0 else nullcontext():
            return run_training(cfg, device, rank, world_size)
    finally:
        if ddp:
            dist.destroy_process_group()


def parse_args(argv=None):
    return cli.parse_config(TrainConfig, argv, __doc__, aliases={"data_path": "dataset"})


if __name__ == "__main__":
    with cli.one_line_errors():
        train(parse_args())
