"""
The toy fine-tuning setup that notebooks 02 (LoRA) and 03 (QLoRA) share, so that both train and measure the same
way: this repository's own Python source as UTF-8 bytes, turned into small "tasks" (the text as it is, in UPPER
CASE, in rot13), each cut 90% train / 10% validation; random windows of a task as batches; a bare AdamW loop over
whatever requires grad; a validation loss over fixed batches. (train.py does all of this at full size; the
notebooks want something that runs in minutes and that they can look inside.)
"""

import codecs
import glob
import os

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORMS = {"code": lambda text: text, "upper": str.upper, "rot13": lambda text: codecs.encode(text, "rot13")}


def repository_source():
    """The top-level .py files of the repository, in name order, as one string."""
    paths = sorted(glob.glob(os.path.join(REPO_DIR, "*.py")))
    return "".join(open(path, encoding="utf-8").read() for path in paths)


class ToyTasks:
    """Each task's token ids, split 90/10, and batches of `batch_size` windows of `block_size` + 1 tokens from them."""

    def __init__(self, tokenizer, block_size, batch_size, tasks=("code", "upper", "rot13")):
        source = repository_source()
        self.texts = {task: TRANSFORMS[task](source) for task in tasks}
        self.block_size, self.batch_size = block_size, batch_size
        self.ids = {}
        for task, text in self.texts.items():
            ids = torch.tensor(tokenizer.encode(text))
            split = int(0.9 * len(ids))
            self.ids[task] = {"train": ids[:split], "val": ids[split:]}

    def get_batch(self, task, split, generator):
        """(inputs, targets): random windows of the split, the targets shifted by one position."""
        ids = self.ids[task][split]
        starts = torch.randint(len(ids) - self.block_size - 1, (self.batch_size,), generator=generator)
        x = torch.stack([ids[s : s + self.block_size] for s in starts])
        y = torch.stack([ids[s + 1 : s + 1 + self.block_size] for s in starts])
        return x, y

    def train(self, model, task, steps, lr, param_groups=None):
        """`steps` AdamW steps (no weight decay) on `task` -> the training losses. Only what requires grad is
        optimized (or the given param_groups): that is how a frozen base stays frozen. Every run sees the same
        batches, so runs differ only in what they train."""
        params = param_groups or [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(1)
        model.train()
        losses = []
        for _ in range(steps):
            _, loss = model(*self.get_batch(task, "train", generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        return losses

    @torch.no_grad()
    def val_loss(self, model, task, batches):
        """Mean loss over the first `batches` validation batches of `task`: the same batches every time."""
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(123)
        loss = sum(model(*self.get_batch(task, "val", generator))[1].item() for _ in range(batches)) / batches
        model.train(was_training)
        return loss
