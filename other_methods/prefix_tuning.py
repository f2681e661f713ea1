"""
Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

Instead of changing any weight, prefix tuning prepends P "virtual tokens" to every sequence, at every layer at
once: each attention layer gets P extra keys and values that every real token can attend to (§4.1, Figure 2).
They are free parameters, not the activations of any real word, so they can steer each layer directly:

    attention(q, [K_prefix; K], [V_prefix; V])        K_prefix, V_prefix: P x d per layer, trained; base frozen

Trainable numbers: P x n_layer x 2 x d (the keys and values of every layer). In model.GPT terms the prefix is a
KV cache that was learned rather than computed, so `GPT.prefix` fills an empty KVCache with it before the first
real token, and the real tokens take positions P..P+T-1, as if the virtual tokens had come first. That is also
how Li & Liang's code (HF GPT-2 with `past_key_values`) and HF `peft` run it; it leaves block_size - P positions
for real tokens.

Reparameterisation (§4.3): training the prefix directly was unstable for the authors, so they train a small
MLP that produces it, P_θ[i, :] = MLP(P'_θ[i, :]), from P embeddings of width d; after training only the
prefix it produces is kept (`bake_prefix`). Initialisation (§7.2): starting from the activations of real words
works better than random, so by default the prefix is the frozen model's own keys and values for P token ids.

Where it costs: nothing is merged away, so every layer attends over P more positions, and P positions of the
context are spent on the prefix.
"""

import torch
import torch.nn as nn

from model import GPT, KVCache
from other_methods import check_new_adapter, train_only


class PrefixMLP(nn.Module):
    """The reparameterisation of §4.3: P embeddings of width d -> Linear(d, hidden) -> tanh -> Linear(hidden, L·2·d),
    each output row read as (layer, key/value, d), the same layout as a directly trained prefix."""

    def __init__(self, num_virtual_tokens, n_layer, n_embd, hidden_size):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, n_embd))  # like nn.Embedding's N(0, 1)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, hidden_size), nn.Tanh(), nn.Linear(hidden_size, n_layer * 2 * n_embd)
        )
        self.shape = (num_virtual_tokens, n_layer, 2, n_embd)

    def forward(self):
        return self.mlp(self.embedding).view(self.shape)


class PrefixTuning(nn.Module):
    """The learned prefix of one GPT, installed as `gpt.prefix` by apply_prefix_tuning (it wraps nothing: its base
    is None, what gpt.prefix is without it). Called by GPT.hidden_states with an empty KVCache, it appends the
    prefix's keys and values to it. A directly trained prefix is one tensor `prefix` of shape (P, n_layer, 2, n_embd):
    [i, l, 0] is virtual token i's key at layer l, [i, l, 1] its value, each n_embd = n_head x head_size wide."""

    method = "prefix"
    base = None

    def __init__(self, config, num_virtual_tokens, initial_prefix=None, hidden_size=0):
        super().__init__()
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.num_virtual_tokens = num_virtual_tokens
        self.prefix = nn.Parameter(initial_prefix) if initial_prefix is not None else None
        self.reparameterization = None
        if initial_prefix is None:  # trained through PrefixMLP
            self.reparameterization = PrefixMLP(num_virtual_tokens, self.n_layer, self.n_embd, hidden_size)

    def prefix_keys_values(self):
        """(P, n_layer, 2, n_embd) keys and values."""
        return self.prefix if self.prefix is not None else self.reparameterization()

    def forward(self, batch_size, kv_cache):
        kv = self.prefix_keys_values()
        P, head_size = kv.size(0), self.n_embd // self.n_head
        # (P, L, 2, n_head, head_size) -> (L, 2, n_head, P, head_size): the (B, n_head, T, head_size) layout of the cache
        kv = kv.view(P, self.n_layer, 2, self.n_head, head_size).permute(1, 2, 3, 0, 4)
        for layer in range(self.n_layer):
            keys = kv[layer, 0].unsqueeze(0).expand(batch_size, -1, -1, -1)
            values = kv[layer, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
            kv_cache.update(layer, keys, values)
        return kv_cache

    @torch.no_grad()
    def bake_prefix(self):
        """Replace the MLP by the prefix it produces (§4.3: after training only the prefix is kept)."""
        if self.reparameterization is None:
            raise ValueError("this prefix has no reparameterisation MLP to bake")
        self.prefix = nn.Parameter(self.reparameterization().detach().clone())
        self.reparameterization = None
        self.settings = {**self.settings, "reparameterize": False, "hidden_size": 0}


def find_gpt(model):
    """The one model.GPT in `model` (the model itself, or e.g. a classifier's .gpt)."""
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if len(gpts) != 1:
        raise ValueError(f"prefix tuning needs exactly one model.GPT inside the model, found {len(gpts)}")
    return gpts[0]


@torch.no_grad()
def activations_of_tokens(gpt, token_ids):
    """(P, n_layer, 2, n_embd): the keys and values the frozen gpt computes for token_ids (Li & Liang §7.2's
    initialisation from real words). Any active prefix is switched off while they are computed."""
    saved, gpt.prefix = gpt.prefix, None
    try:
        cache = KVCache(gpt.config.n_layer)
        gpt.hidden_states(torch.tensor([token_ids], device=gpt.transformer.wte.weight.device), kv_cache=cache)
    finally:
        gpt.prefix = saved
    # each cache entry is (1, n_head, P, head_size) -> (P, n_embd) with heads side by side
    per_layer = [
        torch.stack([k[0].transpose(0, 1).flatten(1), v[0].transpose(0, 1).flatten(1)], dim=1)
        for k, v in zip(cache.keys, cache.values)
    ]
    return torch.stack(per_layer, dim=1)


def apply_prefix_tuning(
    model, num_virtual_tokens=10, reparameterize=False, hidden_size=512, init_token_ids=None, trainable=()
):
    """Give the model's GPT a trainable prefix of num_virtual_tokens keys and values per layer, freeze everything
    else, and return the model.

    reparameterize: train it through PrefixMLP with `hidden_size` hidden units (§4.3), else train it directly.
    init_token_ids: a direct prefix starts as the frozen model's keys and values for these P token ids (§7.2);
    None draws P token ids at random from the vocabulary (torch's global generator). trainable: modules to keep
    trainable too, e.g. ("head",)."""
    gpt = find_gpt(model)
    for name, value in (
        ("num_virtual_tokens", num_virtual_tokens),
        ("hidden_size", hidden_size if reparameterize else 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}; Li & Liang used 10 to 200 tokens")
    if num_virtual_tokens >= gpt.config.block_size:
        raise ValueError(
            f"{num_virtual_tokens} virtual tokens leave no room in a block_size of {gpt.config.block_size}; use fewer"
        )
    trainable = check_new_adapter(model, trainable)
    initial_prefix = None
    if not reparameterize:
        if init_token_ids is None:
            init_token_ids = torch.randint(0, gpt.config.vocab_size, (num_virtual_tokens,)).tolist()
        init_token_ids = list(init_token_ids)
        if len(init_token_ids) != num_virtual_tokens:
            raise ValueError(
                f"init_token_ids has {len(init_token_ids)} ids for {num_virtual_tokens} virtual tokens; give one per token"
            )
        initial_prefix = activations_of_tokens(gpt, init_token_ids).clone()
    weight = gpt.transformer.wte.weight
    hidden_size = hidden_size if reparameterize else 0
    gpt.prefix = PrefixTuning(gpt.config, num_virtual_tokens, initial_prefix, hidden_size).to(
        weight.device, weight.dtype
    )
    gpt.prefix.settings = dict(
        num_virtual_tokens=num_virtual_tokens, reparameterize=reparameterize, hidden_size=hidden_size
    )
    train_only(model, [gpt.prefix], trainable)
    return model


def prefix_parameter_count(num_virtual_tokens, n_layer, n_embd, reparameterize=False, hidden_size=512):
    """Trainable numbers: P x n_layer x 2 x n_embd directly; with the MLP, P x d + (d + 1) x h + (h + 1) x 2·L·d."""
    if not reparameterize:
        return num_virtual_tokens * n_layer * 2 * n_embd
    return num_virtual_tokens * n_embd + (n_embd + 1) * hidden_size + (hidden_size + 1) * 2 * n_layer * n_embd
