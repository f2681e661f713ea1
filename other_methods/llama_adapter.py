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

In model.GPT each attention layer has a slot, `attn.adaption_prompt`, which this file fills with an AdaptionPrompt:
called with the layer's queries and the layer itself, it returns the gated term g_l · softmax(S_P) V_P, which the
attention adds to y before W_o. The queries are the ones the attention computed, and the projections are the layer's
own modules (so a LoRA or 4-bit projection serves the prompts as it serves the tokens). The prompts enter no KV cache:
a cached generation step's queries attend to them afresh. Adapter v2's extra scales and biases are not built here.
"""

import math

import torch
import torch.nn as nn

from other_methods.prefix_tuning import find_gpt
from other_methods import check_new_adapter, train_only


class AdaptionPrompt(nn.Module):
    """The adaption prompts of one attention layer: `prompt` (K, n_embd) and `gate` (n_head,), zeros. Installed as
    `attn.adaption_prompt` by apply_llama_adapter; it wraps nothing (its base is None, what the slot holds without
    it): the attention calls it."""

    method = "llama_adapter"
    base = None

    def __init__(self, n_head, n_embd, prompt_length, init_std, like):
        """Prompts drawn from N(0, init_std^2) (the official code's nn.Embedding, i.e. N(0, 1), by default), gates at
        zero; on the device and in the dtype of the tensor `like`."""
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        prompt = torch.randn(prompt_length, n_embd) * init_std
        self.prompt = nn.Parameter(prompt.to(like.device, like.dtype))
        self.gate = nn.Parameter(torch.zeros(n_head, device=like.device, dtype=like.dtype))

    def forward(self, q, attention):
        """q: (B, n_head, T, head_size), the layer's queries; attention: the model.CausalSelfAttention calling.
        Returns g · softmax(q K_P^T / sqrt(head_size)) V_P, (B, n_head, T, head_size)."""
        head_size = self.n_embd // self.n_head
        # (K, n_embd) -> (n_head, K, head_size): the prompts' keys and values through the layer's frozen projections
        keys = attention.k_proj(self.prompt).view(-1, self.n_head, head_size).transpose(0, 1)
        values = attention.v_proj(self.prompt).view(-1, self.n_head, head_size).transpose(0, 1)
        scores = q @ keys.transpose(-2, -1) / math.sqrt(head_size)  # (B, n_head, T, K)
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # a softmax of their own, over the K prompts only
        return self.gate.view(1, -1, 1, 1) * (weights @ values)


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
        block.attn.adaption_prompt = AdaptionPrompt(gpt.config.n_head, gpt.config.n_embd, prompt_length, init_std, like)
        block.attn.adaption_prompt.settings = settings
    train_only(model, [block.attn.adaption_prompt for block in gpt.transformer.h[start_layer:]], trainable)
    return model


def llama_adapter_parameter_count(n_layer, n_head, n_embd, prompt_length=10, start_layer=0):
    """L·K·d prompt numbers plus L·n_head gates, L = n_layer - start_layer adapted layers."""
    layers = n_layer - start_layer
    return layers * prompt_length * n_embd + layers * n_head
