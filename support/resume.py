"""
Where a train.py run starts, and what stops it: a fresh run replaces an earlier run's files; --resume continues a run
from out_dir/ckpt.pt exactly where it stopped; a NaN or infinity stops it with the last good checkpoint kept.

--resume accepts only a checkpoint made with the settings that shape the tensors, the optimizer and the data (each one
that differs is named); every tensor is accounted for; the random generators are restored, so the resumed run repeats
the uninterrupted one.
"""

import os

import torch

from support.checkpoints import load_weights
from support.safety import UserError, check_finite, load_tensor_file, new_run_id, remove_earlier_run


def start_run(path, cfg, model, optimizer, device, writes=True):
    """-> (step to start at, log rows, the measurements made before training, run id): with --resume the checkpoint at
    `path` loaded into the model and optimizer (resume_run); otherwise step 0 of a new run, whose process that writes
    (`writes`: rank 0 under torchrun) first removes an earlier run's files from out_dir (RUN_FILES)."""
    if cfg.resume:
        return resume_run(path, cfg, model, optimizer, device)
    if writes:
        remove_earlier_run(cfg.out_dir, RUN_FILES, hint=" (--resume continues it instead)")
    return 0, [], {}, new_run_id()


def stop_if_diverged(step, rows, cfg, **values):
    """Stop the run at the first NaN or infinity among `values` (e.g. training_loss=..., gradient_norm=...: named in
    the message as "the training loss is nan and the gradient norm nan"), before it reaches the weights or a file;
    out_dir keeps the checkpoint of the last evaluation (safety.check_finite)."""
    (first, value), *others = values.items()
    what = f"the {first.replace('_', ' ')} is {value:g}"
    what += "".join(f" and the {name.replace('_', ' ')} {other:g}" for name, other in others)
    check_finite(step, what, list(values.values()), last_saved_step(rows), cfg.out_dir, cfg.learning_rate)


def resume_run(path, cfg, model, optimizer, device):
    """Load the checkpoint at `path` into the model and optimizer -> (step to start at, log rows, the measurements
    made before training, run id)."""
    ckpt = load_resume_checkpoint(path, cfg)
    load_trained_tensors(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_random_state(ckpt, device)
    print(f"resumed from {path} at step {ckpt['iter']}")
    return ckpt["iter"], ckpt["log"], ckpt["before"], ckpt.get("run_id") or new_run_id()


# every file a train.py run writes into its out_dir: a fresh run removes an earlier run's before it starts
RUN_FILES = ("ckpt.pt", "adapter_model.safetensors", "adapter_config.json", "log.csv", "loss.png", "samples.json", "answers.csv",
             "summary.json")


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
    if ckpt["iter"] > cfg.max_iters:  # the run would train nothing, and report the checkpoint as a run of max_iters steps
        raise UserError(f"--resume: {path} is at step {ckpt['iter']}, past --max_iters {cfg.max_iters}, so there is nothing to "
                        f"train; give a --max_iters above {ckpt['iter']} to train on")
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
        load_weights(model, ckpt["model"])  # checks missing, unexpected and wrongly shaped tensors
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
