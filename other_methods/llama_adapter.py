"""
LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
arXiv:2303.16199, §3.1-3.2): learned prompts behind a gate that starts closed.

Prefix tuning (prefix_tuning.py) gives each layer learned keys and values that the real tokens attend to in the same
softmax as their own: from the first step some attention goes to the prefix, so the model starts disturbed, which the
paper argues harms the stability of early training. LLaMA-Adapter keeps learned prompts and removes the disturbance:

  - K learnable adaption prompts P_l (K x d) in each of the top L layers. The layer's own frozen key and value
    projections turn them into keys and values, with no position (they stand before every sequence alike);
  - each query attends to them with a softmax of its own, apart from the softmax over the tokens;
  - that attention output is multiplied by a gate g_l that starts at zero ("zero-init attention"), and joins the
    tokens' attention output before the output projection W_o.

For one head of layer l, with queries Q (T x d_head), the tokens' keys and values K, V (causal mask M) and the prompts':

    S_P = Q (P_l W_k + b_k)^T / sqrt(d_head)                        scores against the K prompt keys
    y   = softmax(Q K^T / sqrt(d_head) + M) V  +  g_l · softmax(S_P) (P_l W_v + b_v)
    out = y W_o^T + b_o                                                  (heads side by side before W_o)

The paper writes the same as one score vector [S_P; S_tokens] whose two parts get separate softmaxes and the first
part the factor g_l. As lit-gpt does, g_l has one entry per head. With g_l = 0 the model computes exactly what the base
does; the prompts get a gradient only once the gates have opened. Only the prompts and the gates train:
L·K·d + L·n_head numbers; GPT-2 124M with K = 10 from layer 2 (L = 10): 10·10·768 + 10·12 = 76,920.

Here each adapted attention layer is wrapped (AdaptedAttention): the frozen layer computes its own output, and the
wrapper adds W_o (g_l · softmax(S_P) V_P), which is the paper's term joined before W_o, since W_o is linear (its bias
counted once, in the layer's output). The prompts go through the layer's own frozen projections (so a 4-bit layer
serves the prompts as it serves the tokens). They enter no KV cache: a cached generation step's queries attend to
them afresh. Adapter v2's extra scales and biases are not built here.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import dense_weight
from other_methods import check_new_adapter, train_only
from other_methods.prefix_tuning import find_gpt


class AdaptedAttention(nn.Module):
    """A frozen model.CausalSelfAttention (`base`) plus its layer's adaption prompts: `prompt` (K, n_embd), drawn
    from N(0, init_std^2) (the official code's nn.Embedding, i.e. N(0, 1), by default), and `gate` (n_head,), zeros."""

    method = "llama_adapter"

    def __init__(self, base, prompt_length, init_std, like):
        super().__init__()
        self.base, self.n_head = base, base.n_head
        n_embd = base.o_proj.in_features
        self.prompt = nn.Parameter((torch.randn(prompt_length, n_embd) * init_std).to(like.device, like.dtype))
        self.gate = nn.Parameter(torch.zeros(self.n_head, device=like.device, dtype=like.dtype))

    def forward(self, x, kv_cache=None, attn_mask=None, starts=None):
        """The layer's output plus W_o (g · softmax(q K_P^T / sqrt(head_size)) V_P), q the layer's queries."""
        B, T, C = x.shape
        head_size = C // self.n_head
        q = self.base.q_proj(x).view(B, T, self.n_head, head_size).transpose(1, 2)  # (B, n_head, T, head_size)
        # (K, n_embd) -> (n_head, K, head_size): the prompts' keys and values through the layer's frozen projections
        keys = self.base.k_proj(self.prompt).view(-1, self.n_head, head_size).transpose(0, 1)
        values = self.base.v_proj(self.prompt).view(-1, self.n_head, head_size).transpose(0, 1)
        scores = q @ keys.transpose(-2, -1) / math.sqrt(head_size)  # (B, n_head, T, K)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # a softmax of their own, over the K prompts only
        prompted = (self.gate.view(1, -1, 1, 1) * (weights @ values)).transpose(1, 2).reshape(B, T, C)
        extra = F.linear(prompted, dense_weight(self.base.o_proj))  # W_o, its bias already in the layer's output
        return self.base(x, kv_cache, attn_mask, starts) + self.base.resid_dropout(extra)


def apply_llama_adapter(model, prompt_length=10, start_layer=0, init_std=1.0, trainable=()):
    """Give every attention layer from `start_layer` up (the paper's top L layers) prompt_length adaption prompts and a
    zero gate per head, freeze everything else and return the model. The paper used the top 30 of LLaMA-7B's 32
    layers and K = 10; lit-gpt starts at layer 2. trainable: modules to keep trainable as well, e.g. ("head",)."""
    gpt = find_gpt(model)
    n_layer = gpt.config.n_layer
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length <= 0:
        raise ValueError(
            f"prompt_length must be a positive integer (K, the prompts per layer), got {prompt_length!r}; "
            f"the paper used 10"
        )
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be a positive number, got {init_std!r}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n_layer:
        raise ValueError(
            f"start_layer must be a layer index from 0 to {n_layer - 1} (this model has {n_layer} "
            f"layers), got {start_layer!r}"
        )
    trainable = check_new_adapter(model, trainable)
    settings = dict(prompt_length=prompt_length, start_layer=start_layer, init_std=float(init_std))
    like = gpt.transformer.wte.weight  # the model's device and floating-point dtype (projections may be 4-bit)
    for block in gpt.transformer.h[start_layer:]:
        block.attn = AdaptedAttention(block.attn, prompt_length, init_std, like)
        block.attn.settings = settings
    train_only(model, [block.attn for block in gpt.transformer.h[start_layer:]], trainable)
    return model


def llama_adapter_parameter_count(n_layer, n_head, n_embd, prompt_length=10, start_layer=0):
    """L·K·d prompt numbers plus L·n_head gates, L = n_layer - start_layer adapted layers."""
    layers = n_layer - start_layer
    return layers * prompt_length * n_embd + layers * n_head
