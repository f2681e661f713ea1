"""
The copy probe: can a base model copy from its context?

A list of random letter strings ("qzrt fhwab ...") is unpredictable the first time; written a second time right
after itself, every byte of the repeat is in the context already. A model with induction heads (attend to what
followed the last occurrence of the current byte, and predict it again) predicts the repeat far better than the
first copy; a model without them predicts both equally badly. The difference is what instruction tuning needs
most, since most answers copy a word out of the prompt.

    python -m experiments.copy_probe checkpoints/tiny-base            # mean nats per byte, first and second copy
    python -m experiments.copy_probe checkpoints/tiny-base checkpoints/plain-base

Prints one line per checkpoint. Random strings are a harder test than English words (nothing but the context helps),
so the numbers are far above the validation loss.
"""

import argparse
import random

import torch
import torch.nn.functional as F

from support.checkpoints import load_checkpoint_model
from support.tokenizer import get_tokenizer


def random_words(rng, count=12):
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))) for _ in range(count)
    )


@torch.no_grad()
def copy_losses(model, tokenizer, lists=32, seed=0):
    """Mean cross-entropy (nats per byte) over the first copy and over the second copy of `lists` random word lists,
    each fed as 'words. words'. Each copy's first byte (which no context can predict) and the separator are left out."""
    model.eval()
    rng = random.Random(seed)
    first = second = 0.0
    for _ in range(lists):
        words = tokenizer.encode(random_words(rng))
        ids = torch.tensor([words + tokenizer.encode(". ") + words])
        logits, _ = model(ids[:, :-1])
        losses = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
        first += losses[: len(words) - 1].mean().item() / lists  # targets 1 .. n-1: the first copy after its first byte
        second += losses[len(words) + 2 :].mean().item() / lists  # targets n+3 ..: the second copy after its first byte
    return first, second


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoints", nargs="+", help="checkpoint files or folders written by train.py --init_from scratch"
    )
    parser.add_argument(
        "--lists", type=int, default=32, help="random word lists to average over (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for path in args.checkpoints:
        model, tokenizer_name = load_checkpoint_model(path)
        first, second = copy_losses(model, get_tokenizer(tokenizer_name), args.lists)
        print(f"{path}: first copy {first:.3f}, second copy {second:.3f} nats/byte")


if __name__ == "__main__":
    main()
