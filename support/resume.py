"""
A train.py run's checkpoints: saved (ckpt.pt, the adapter and the log renamed together), and where a run starts: fresh
(an earlier run's files removed) or --resume (the same settings, every tensor, the random state: the same trajectory).
A NaN or infinity stops the run with the last good checkpoint kept.
"""

import os
from dataclasses import asdict

import torch

from support import reports
from support.adapters import save_adapter
from support.checkpoints import load_weights
from support.files import UserError, load_tensor_file, save_atomic, write_together
from support.instructions import resolve_template
from support.runs import check_finite, new_run_id, remove_earlier_run

# every file a train.py run writes into its out_dir: a fresh run removes an earlier run's before it starts
RUN_FILES = ("ckpt.pt", "adapter_model.safetensors", "adapter_config.json", "log.csv", "loss.png", "samples.json")
RUN_FILES += ("answers.csv", "summary.json")


def save_checkpoint(model, optimizer, cfg, tokenizer_name, mode, step, rows, before, path, run_id, base_sha256=None):
    """ckpt.pt (tensors and plain containers: every weight, or what trained, and what --resume needs), the adapter
    (with its base's fingerprint: it loads on no other base) and the log, renamed into place together."""
    ckpt = dict(model_config=vars(model.config).copy(), tokenizer=tokenizer_name, train_config=asdict(cfg), mode=mode)
    ckpt |= dict(iter=step, optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), log=rows, before=before)
    ckpt |= dict(cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None, run_id=run_id)
    adapter = mode in ("lora", "qlora")
    if adapter:
        ckpt["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    else:
        ckpt["model"] = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with write_together():
        if adapter:  # the adapter names its own base, so chat.py needs no other file of the run
            template = resolve_template(cfg.prompt_template, tokenizer_name)
            trained_on = dict(run_id=run_id, init_from=cfg.init_from, finetune=mode, step=step)
            trained_on |= dict(prompt_template=template, tokenizer=tokenizer_name, base_sha256=base_sha256)
            save_adapter(model, os.path.dirname(path), metadata=trained_on)  # adapter_model.safetensors + its config
        save_atomic(ckpt, path)
        reports.write_train_log(rows, cfg, mode)


def start_run(path, cfg, model, optimizer, device, writes=True):
    """-> (step to start at, log rows, the measurements made before training, run id): with --resume from the
    checkpoint at `path`; else step 0, an earlier run's files first removed by the process that writes."""
    if not cfg.resume:
        if writes:
            remove_earlier_run(cfg.out_dir, RUN_FILES, hint=" (--resume continues it instead)")
        return 0, [], {}, new_run_id()
    ckpt = load_resume_checkpoint(path, cfg)
    load_trained_tensors(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_random_state(ckpt, device)
    print(f"resumed from {path} at step {ckpt['iter']}")
    return ckpt["iter"], ckpt["log"], ckpt["before"], ckpt["run_id"]


def stop_if_diverged(step, rows, cfg, **values):
    """Stop at the first NaN or infinity among `values` (training_loss=..., named "the training loss is nan"), with
    out_dir keeping the checkpoint of the last evaluation."""
    (first, value), *others = values.items()
    what = f"the {first.replace('_', ' ')} is {value:g}"
    what += "".join(f" and the {k.replace('_', ' ')} {v:g}" for k, v in others)
    saved = [r["iter"] for r in rows if r["val_loss"] != ""]  # each evaluation ends with a save
    check_finite(step, what, list(values.values()), saved[-1] if saved else None, cfg.out_dir, cfg.learning_rate)


def settings_that_shape_the_run(cfg):
    """What the tensors and optimizer state were made with (load_state_dict would silently bring back the saved
    decay and betas) and, fine-tuning, what makes the examples' batches and prompts: --resume must keep them."""
    names = ["init_from", "dataset", "loraplus_ratio", "weight_decay", "beta1", "beta2"]
    if cfg.pretraining:
        return names + ["n_layer", "n_head", "n_embd", "block_size", "smear_keys"]
    names += ["finetune", "prompt_template", "pack"]
    if cfg.finetune == "lora":
        names += ["quantize", "lora_rank", "lora_alpha", "lora_targets", "use_rslora", "use_dora"]
    return names


def load_resume_checkpoint(path, cfg):
    """out_dir/ckpt.pt for --resume; refused unless made with this run's settings_that_shape_the_run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    fix = "start the run afresh, without --resume"
    ckpt = load_tensor_file(path, fix=fix)
    for key in ("train_config", "iter", "optimizer", "rng", "log", "before", "run_id"):
        if key not in ckpt:
            raise UserError(f"{path} has no {key!r}, so --resume cannot continue from it; {fix}")
    saved = ckpt["train_config"]
    names = [name for name in settings_that_shape_the_run(cfg) if saved.get(name) != getattr(cfg, name)]
    differ = ", ".join(f"--{name} {saved.get(name, '(not recorded)')} (now {getattr(cfg, name)})" for name in names)
    if differ:
        raise UserError(f"--resume: {path} was trained with {differ}; resume with those, or use another --out_dir")
    if ckpt["iter"] > cfg.max_iters:  # it would train nothing, and report the checkpoint as a run of max_iters steps
        step = ckpt["iter"]
        past = f"is at step {step}, past --max_iters {cfg.max_iters}, so there is nothing to train"
        raise UserError(f"--resume: {path} {past}; give a --max_iters above {step}")
    return ckpt


def restore_random_state(ckpt, device):
    """The CPU's generator (batches, dropout) and on a GPU the CUDA ones, as the checkpoint left them."""
    torch.set_rng_state(ckpt["rng"])
    if device.startswith("cuda") and ckpt.get("cuda_rng"):
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


def load_trained_tensors(model, ckpt, path):
    """Every weight (pretraining, full fine-tuning), or exactly the parameters that train (LoRA), each in its shape."""
    if "model" in ckpt:
        return load_weights(model, ckpt["model"])  # names a missing, unexpected or wrongly shaped tensor
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    stored = ckpt.get("trainable", {})
    missing, unexpected = [n for n in trainable if n not in stored], [n for n in stored if n not in trainable]
    if missing or unexpected:
        parts = [f"{len(missing)} trained tensors missing, e.g. {missing[0]!r}"] if missing else []
        parts += [f"{len(unexpected)} it has no place for, e.g. {unexpected[0]!r}"] if unexpected else []
        raise UserError(f"{path} does not fit this model: {'; '.join(parts)}")
    for n, v in stored.items():
        if v.shape != trainable[n].shape:
            raise UserError(f"{path}: tensor {n!r} is {tuple(v.shape)} but the model's is {tuple(trainable[n].shape)}")
    model.load_state_dict(stored, strict=False)  # not strict only because the frozen base is not in the file
