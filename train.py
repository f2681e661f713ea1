"""
Train a GPT: pretrain the tiny base from scratch, or fine-tune a base on instructions (full, LoRA or QLoRA). Like
nanoGPT's train.py it reads in the order it runs: configuration, model, data, the loop, save. What is not the lesson
(checks of the settings, --resume, reports, the modes that answer with or export a run) is in support/.

    python train.py                                # LoRA instruction tuning of the tiny base (pretrained if missing)
    python train.py --finetune full                # every weight trains instead
    python train.py --quantize nf4                 # QLoRA: LoRA on a 4-bit NF4 base
    python train.py --init_from scratch --dataset stdlib --out_dir checkpoints/tiny-base   # pretrain the tiny base
    python train.py --adapter out/instruct --prompt "Give an antonym of 'hot'."            # answer with base + adapter
    python train.py --adapter out/instruct --answer_file my.json   # answer a file (--export_peft, --export_hf: export)
    torchrun --nproc_per_node=4 train.py --init_from gpt2 --dataset instruction-data --grad_accum 8   # data-parallel
"""

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from lora import apply_lora
from model import GPT, PRETRAINED, GPTConfig, count_parameters
from quantize import quantize_model
from support.adapters import save_adapter
from support.checkpoints import load_base_model
from support.common import autocast_context, parse_config, pick_device, reset_peak_memory, save_atomic, write_together
from support.config_checks import check_inference_flags, check_train_config
from support.corpus import PretrainingData
from support.fast_dequantize import use_fast_dequantize
from support.ddp import World, init_world
from support.instructions import InstructionData, check_max_new_tokens, resolve_template
from support.loss import LossAtTargets
from support.optim import clip_gradients, lr_at_step, make_optimizer, set_learning_rate
from support.reports import progress_bar, report_run, write_train_log
from support.resume import RUN_FILES, last_saved_step, resume_run
from support.safety import check_finite, error_line, lock_out_dir, main_errors, new_run_id, remove_earlier_run
from support.tokenizer import get_tokenizer
from support.train_modes import run_without_training, trains_nothing


@dataclass
class TrainConfig:
    # the job: what to start from, what to learn, where the results go
    init_from: str = "tiny"  # 'tiny' (checkpoints/tiny-base, pretrained first if missing), 'scratch' (pretrain a
                             # new model), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, an HF GPT-2 directory, or the
                             # out_dir of a pretraining or full fine-tuning run
    dataset: str = "embedded"  # 'embedded' (data/instructions.json), 'instruction-data' or 'alpaca' (downloaded), an
                               # Alpaca or chat .json/.jsonl file, or 'stdlib' to pretrain (--data_path: the same)
    out_dir: str = "out/instruct"  # where the log, plots, samples, summary.json and checkpoints go
    finetune: Literal["lora", "full"] = "lora"  # train adapters only, or every weight
    quantize: Literal["none", "nf4"] = "none"  # nf4: QLoRA, the frozen base in 4-bit NF4 with double quantization
    dequantize: Literal["reference", "table", "kernel"] = "reference"  # --quantize nf4: a faster way to the same values
    # LoRA (--finetune lora; on a 4-bit base with --quantize nf4)
    lora_rank: int = 32  # rank r of each update B @ A
    lora_alpha: float = 0.0  # scaling = alpha / r (alpha / sqrt(r) with --use_rslora); default (0): 2 x rank, so
                             # alpha / r = 2 at every rank (finetune_classifier.py does the same)
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
                                # (the tiny base) or 3e-4 (GPT-2)
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
    # answer with, or export, a trained run (these train nothing; python chat.py answers each line you type)
    adapter: str = ""  # the out_dir of a LoRA run: its base + adapter answer or are exported
    prompt: str = None  # answer this instruction, and exit
    answer_file: str = ""  # answer every example of this Alpaca-format (or chat) JSON file, and exit
    answers_out: str = ""  # where --answer_file writes its examples with a 'response' added; default: IN.answers.json
    export_peft: str = ""  # write the --adapter run's adapter in PEFT's format to this directory, and exit
    export_hf: str = ""  # write --init_from's model (--adapter's merged in) as an HF GPT-2 directory, and exit

    @property
    def pretraining(self):
        return self.init_from == "scratch"


def resolve_defaults(cfg):
    """Fill in the settings whose sensible value depends on the job (the 0 defaults above). A model that read GPT-2's
    weights needs gentler full fine-tuning and fewer steps than the tiny base, which starts far from done."""
    pre, full = cfg.pretraining, cfg.finetune == "full"
    gpt2 = cfg.init_from in PRETRAINED or os.path.isfile(os.path.join(cfg.init_from, "model.safetensors"))
    cfg.max_iters = cfg.max_iters or (1000 if pre else 200 if gpt2 else 4200)  # 200 x 16: ~3 epochs of instruction-data
    # the tiny base learns more per second from many small steps: 4,200 x 8, each batch of about one length, cost what
    # 1,200 x 16 did (docs/results.md)
    cfg.batch_size = cfg.batch_size or (16 if pre or gpt2 else 8)
    cfg.learning_rate = cfg.learning_rate or (4e-3 if pre else (3e-4 if gpt2 else 2e-3) if full else 3e-3)
    cfg.lora_alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    cfg.warmup_iters = cfg.warmup_iters or max(1, cfg.max_iters // 20)
    cfg.eval_interval = cfg.eval_interval or max(1, cfg.max_iters // 10)
    return cfg


def prepare_model(cfg, device):
    """Build or load the model and make the chosen parameters trainable -> (model, tokenizer name, mode)."""
    if cfg.pretraining:  # a byte-level GPT of the configured shape, from random weights
        config = GPTConfig(block_size=cfg.block_size, vocab_size=257, n_layer=cfg.n_layer, n_head=cfg.n_head,
                           n_embd=cfg.n_embd, dropout=cfg.dropout, smear_keys=cfg.smear_keys)
        return GPT(config).to(device), "bytes", "pretrain"
    model, tokenizer_name = load_base_model(cfg.init_from, device, progress=cfg.progress)
    if cfg.finetune == "full":
        return model, tokenizer_name, "full"
    if cfg.quantize == "nf4":
        quantize_model(model)  # QLoRA: every linear layer but the tied output head to 4-bit NF4, frozen
        use_fast_dequantize(model, cfg.dequantize)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, dropout=cfg.lora_dropout,
               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)  # freezes everything but the new adapters
    return model, tokenizer_name, "qlora" if cfg.quantize == "nf4" else "lora"


def run_training(cfg, world=None):
    """One job end to end, as one process of `world` (default: the only one); returns the summary, also written to
    out_dir/summary.json (None on the ranks other than 0, which write nothing)."""
    world, device = world or World(), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer_name, mode = prepare_model(cfg, device)
    tokenizer, block_size = get_tokenizer(tokenizer_name), model.config.block_size
    template = resolve_template(cfg.prompt_template, tokenizer_name)
    if cfg.pretraining:  # windows of the standard library's text
        data = PretrainingData(tokenizer, block_size, cfg.seed, cfg.corpus)
    else:  # prompt + response examples; the response's tokens are the targets (--mask_prompt)
        check_max_new_tokens(cfg.max_new_tokens, block_size)
        data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, template, pack=cfg.pack,
                               grad_accum=cfg.grad_accum, group_by_length=cfg.group_by_length)
    answered = [] if cfg.pretraining else data.test_examples[: cfg.answer_limit]  # scored before and after
    val_batches = data.val_batches(cfg.batch_size)[: cfg.eval_batches or None]
    model.gradient_checkpointing = cfg.grad_checkpointing
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.loraplus_ratio)
    trainable, total = count_parameters(model)
    print(f"{mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}; "
          f"{data.describe()}")

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start, rows, before, run_id = 0, [], {}, new_run_id()
    if cfg.resume:  # the checkpoint's trained tensors, optimizer state, random state and log (support/resume.py)
        start, rows, before, run_id = resume_run(ckpt_path, cfg, model, optimizer, device)
    elif world.is_main:  # a fresh run replaces an earlier run's files; the other ranks write nothing
        remove_earlier_run(cfg.out_dir, RUN_FILES, hint=" (--resume continues it instead)")
    if not before:  # measured once, before the first step, and carried through resumes; each rank scores its share
        before["val_loss"] = world.mean_token_loss(model, val_batches, device)
        if not cfg.pretraining:
            before["test_loss"] = world.mean_token_loss(model, data.val_batches(cfg.batch_size, "test"), device)
            before["answers"] = world.answer_examples(model, tokenizer, answered, device, cfg.max_new_tokens, template)
        print(f"validation loss before training: {before['val_loss']:.4f}")
    # the loss where a target exists, without the B x T x vocab logits (support/loss.py); DDP and compile wrap it
    loss_model = world.wrap(torch.compile(LossAtTargets(model)) if cfg.compile else LossAtTargets(model))
    if world.size > 1:  # each rank its own dropout masks, reproducible from (seed, rank, step resumed at)
        torch.manual_seed(cfg.seed + world.rank + 1_000_003 * start)

    reset_peak_memory(device)
    t0, tokens_seen = time.time(), (rows[-1]["tokens"] if rows else 0)
    seconds_before, tokens_at_start = (rows[-1]["seconds"] if rows else 0.0), tokens_seen
    model.train()
    steps = progress_bar(range(start, cfg.max_iters), mode, cfg.progress, initial=start, total=cfg.max_iters)
    for step in steps:
        lr = lr_at_step(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
        set_learning_rate(optimizer, lr)
        step_loss, step_tokens = 0.0, 0
        micro_batches = world.micro_batches(cfg.grad_accum)  # all of them for one process
        for micro in micro_batches:
            x, y, *segments = data.train_batch(step, micro, cfg.batch_size)  # segment ids only with --pack
            x, y, segment_ids = x.to(device), y.to(device), segments[0].to(device) if segments else None
            with world.sync_unless(loss_model, last=micro == micro_batches[-1]), autocast_context(device):
                loss = loss_model(x, y, segment_ids)
                # x world.size: DDP averages the ranks' gradients; the step's gradient is the micro-batches' mean
                (loss * world.size / cfg.grad_accum).backward()
            step_loss, step_tokens = step_loss + loss.item() / cfg.grad_accum, step_tokens + x.numel()
        step_loss, step_tokens = world.sum(step_loss, step_tokens)
        tokens_seen += int(step_tokens)
        grad_norm = clip_gradients(model, cfg.grad_clip)  # of the gradients all ranks share after DDP's all-reduce
        check_finite(step + 1, f"the training loss is {step_loss:g} and the gradient norm {grad_norm:g}",
                     [step_loss, grad_norm], last_saved_step(rows), cfg.out_dir, cfg.learning_rate)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"iter": step + 1, "lr": lr, "train_loss": step_loss, "val_loss": "", "tokens": tokens_seen,
               "seconds": round(seconds_before + time.time() - t0, 3)}
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters:  # every rank evaluates its share
            row["val_loss"] = world.mean_token_loss(model, val_batches, device)
            check_finite(step + 1, f"the validation loss is {row['val_loss']:g}", [row["val_loss"]],
                         last_saved_step(rows), cfg.out_dir, cfg.learning_rate)
        rows.append(row)
        speed = (tokens_seen - tokens_at_start) / max(time.time() - t0, 1e-9)
        steps.set_postfix(loss=f"{step_loss:.3f}", val=f"{row['val_loss']:.3f}" if row["val_loss"] != "" else "-",
                          tok_s=f"{speed:.0f}", refresh=False)
        if row["val_loss"] != "" and world.is_main:  # every evaluation ends with a save, by rank 0
            save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step + 1, rows, before, ckpt_path, run_id)

    # the last evaluation is shared by the ranks too; rank 0 writes the results (the others get None)
    return report_run(cfg, model, optimizer, mode, data, tokenizer, template, answered, before, rows, device,
                      trainable, total, tokens_seen, run_id, world)


def save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step, rows, before, path, run_id=None):
    """Pretraining and full fine-tuning save every weight; LoRA saves only what trained (the adapter file is the
    shareable artefact, ckpt.pt adds the optimizer state needed to resume). Everything in ckpt.pt is a tensor or a
    plain container, so it loads with torch.load(weights_only=True). The step's files (ckpt.pt, the adapter, log.csv and
    loss.png) are renamed into place together once all are written, so a full disk leaves the last step's whole."""
    ckpt = {"model_config": vars(model.config).copy(), "tokenizer": tokenizer_name, "train_config": asdict(cfg),
            "mode": mode, "iter": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "log": rows,
            "before": before, "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "run_id": run_id}
    if mode in ("lora", "qlora"):
        ckpt["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        # the adapter describes its own base, so --adapter needs no other file of the run; with the base's fingerprint
        # (support.checkpoints.weights_sha256) and tokenizer it loads on no other base
        trained_on = {"run_id": run_id, "init_from": cfg.init_from, "finetune": mode, "step": step,
                      "prompt_template": resolve_template(cfg.prompt_template, tokenizer_name),
                      "tokenizer": tokenizer_name, "base_sha256": model.base_sha256}
    else:
        ckpt["model"] = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with write_together():
        if mode in ("lora", "qlora"):
            save_adapter(model, os.path.dirname(path), metadata=trained_on)  # adapter_model.safetensors + its config
        save_atomic(ckpt, path)
        write_train_log(rows, cfg, mode)


def train(cfg):
    """Run one job; returns its summary. Settings left at 0 get the job's default first (resolve_defaults). The run
    owns out_dir while it lasts: a second run on the same folder is refused (lock_out_dir). Under torchrun rank 0
    alone writes to out_dir, so it holds the lock for all ranks."""
    check_train_config(resolve_defaults(cfg))
    device = pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    world = init_world(device)  # under torchrun: this process's rank among world.size (support/ddp.py)
    try:
        world.micro_batches(cfg.grad_accum)  # a --grad_accum the processes cannot share fails here, before any work
        if not world.is_main:
            cfg.progress = False  # rank 0 alone reports
            return run_training(cfg, world)
        with lock_out_dir(cfg.out_dir):
            return run_training(cfg, world)
    finally:
        world.close()


def parse_args(argv=None):
    return parse_config(TrainConfig, argv, __doc__, aliases={"data_path": "dataset"})


if __name__ == "__main__":
    config = parse_args()
    try:
        check_inference_flags(config)
        if trains_nothing(config):  # --prompt, --answer_file, --export_peft, --export_hf
            run_without_training(config)
        else:
            train(config)
    except main_errors() as e:
        sys.exit(error_line(e))
