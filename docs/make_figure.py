"""Draws docs/lora_qlora.png, the README's picture, from the lesson's own code:

left   h = W0 x + (alpha / r) · B A x for one LoRALinear: the frozen W0 and the thin trained B and A, to scale
right  the 16 NF4 values of quantize.nf4_code_book(): the quantiles of N(0, 1) that QLoRA stores W0 with

python docs/make_figure.py    (a second or two on a CPU; writes docs/lora_qlora.png)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lora import LoRALinear  # noqa: E402
from quantize import nf4_code_book  # noqa: E402

d, r = 48, 4
torch.manual_seed(0)
layer = LoRALinear(nn.Linear(d, d), rank=r, alpha=2 * r)
with torch.no_grad():  # a B that training would have moved off zero, so that BA shows
    layer.lora_B.weight.normal_(0, 0.3)
W0, A, B = layer.base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()

fig = plt.figure(figsize=(11, 3.6))
grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 1], wspace=0.25)
left = grid[0].subgridspec(1, 5, width_ratios=[d, 16, r, 3, d], wspace=0.05)
panels = [(W0, "W0 (frozen)\nd x d"), (B, "B\nd x r"), (A, "A\nr x d")]
for column, (tensor, title) in zip((0, 2, 4), panels):
    ax = fig.add_subplot(left[column])
    ax.imshow(tensor, cmap="RdBu", vmin=-tensor.abs().max(), vmax=tensor.abs().max(), aspect="equal")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
for column, sign in ((1, "+ α/r ·"), (3, "")):
    ax = fig.add_subplot(left[column])
    ax.text(0.5, 0.5, sign, ha="center", va="center", fontsize=11)
    ax.axis("off")
fig.text(
    0.05,
    0.02,
    f"LoRA (Eq. 3): only B and A train, r = {r} of d = {d}: {2 * d * r:,} numbers instead of {d * d:,}",
    fontsize=9,
)

ax = fig.add_subplot(grid[1])
x = torch.linspace(-3.2, 3.2, 400)
ax.plot(x, torch.exp(-(x**2) / 2) / (2 * torch.pi) ** 0.5, color="gray", label="N(0, 1): pretrained weights")
absmax = torch.randn(10_000, 64).abs().amax(dim=1).median()  # a typical block of 64 weights' largest |w|
ax.vlines(
    nf4_code_book() * absmax, 0, 0.05, color="tab:blue", label=f"the 16 NF4 values x {absmax:.2f} (a block's absmax)"
)
ax.set_title("QLoRA §3: W0 stored in 4 bits, one code\nper equal share of a normal distribution", fontsize=10)
ax.set_yticks([]), ax.legend(fontsize=8, loc="upper right", frameon=False)
fig.savefig(os.path.join(ROOT, "docs", "lora_qlora.png"), dpi=110, bbox_inches="tight")
