"""
Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

Instead of changing any weight, prefix tuning prepends P "virtual tokens" to every sequence, at every layer at
once: each attention layer gets P extra keys and values that every real token can attend to (§4.1, Figure 2).
They are free parameters, not the activations of any real word, so they can steer each layer directly:

    attention(q, [K_prefix; K], [V_prefix; V])        K_prefix, V_prefix: P x d per layer, trained; base frozen

Trainable numbers: P x n_layer x 2 x d (the keys and values of every layer). In model.GPT terms the prefix is a
KV cache that was learned rather than computed: each attention layer is wrapped (PrefixAttention) so that it sees
its layer's prefix before whatever its cache holds, and the position table is wrapped (PrefixPositions) so that the
real tokens take positions P..P+T-1, as if the virtual tokens had come first. That is also how Li & Liang's code
(HF GPT-2 with `past_key_values`) and HF `peft` run it; it leaves block_size - P positions for real tokens.

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
    """The learned prefix of one GPT: one tensor `prefix` of shape (P, n_layer, 2, n_embd), [i, l, 0] virtual token
    i's key at layer l and [i, l, 1] its value, each n_embd = n_head x head_size wide (heads side by side); or the
    PrefixMLP that produces it. Shared by the wrappers apply_prefix_tuning puts into the GPT."""

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

    def keys_values(self, layer, batch_size):
        """Layer `layer`'s prefix as two (batch_size, n_head, P, head_size) tensors, the layout of a KVCache."""
        kv = self.prefix_keys_values()[:, layer]  # (P, 2, n_embd)
        kv = kv.view(kv.size(0), 2, self.n_head, self.n_embd // self.n_head).permute(1, 2, 0, 3)
        return kv[0].expand(batch_size, -1, -1, -1), kv[1].expand(batch_size, -1, -1, -1)

    @torch.no_grad()
    def bake_prefix(self):
        """Replace the MLP by the prefix it produces (§4.3: after training only the prefix is kept)."""
        if self.reparameterization is None:
            raise ValueError("this prefix has no reparameterisation MLP to bake")
        self.prefix = nn.Parameter(self.reparameterization().detach().clone())
        self.reparameterization = None
        self.settings.update(reparameterize=False, hidden_size=0)  # the dict every wrapper of the adapter shares


class CacheWithPrefix:
    """A KVCache as one attention layer sees it: the learned prefix's keys and values, then what the real cache holds
    (nothing when there is none, as in training). New keys and values go into the real cache only."""

    def __init__(self, keys, values, cache):
        self.keys, self.values, self.cache = keys, values, cache

    def length(self, layer):
        return self.keys.size(2) + (self.cache.length(layer) if self.cache is not None else 0)

    def update(self, layer, k, v):
        if self.cache is not None:
            k, v = self.cache.update(layer, k, v)
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)


class PrefixAttention(nn.Module):
    """A frozen model.CausalSelfAttention (`base`) that attends over its layer's prefix before the real tokens."""

    method = "prefix"

    def __init__(self, base, prefix, layer):
        super().__init__()
        self.base, self.prefix, self.layer = base, prefix, layer

    def forward(self, x, kv_cache=None, attn_mask=None, starts=None):
        keys, values = self.prefix.keys_values(self.layer, x.size(0))
        P = keys.size(2)
        if attn_mask is not None:  # packed rows: every position may see the prefix
            attn_mask = nn.functional.pad(attn_mask, (P, 0), value=True)
        if starts is not None:  # smeared keys: the prefix's first key starts the sequence
            starts = nn.functional.pad(starts, (0, 0, P, 0), value=False)
            starts[:, :, 0] = True
        return self.base(x, CacheWithPrefix(keys, values, kv_cache), attn_mask, starts)


class PrefixPositions(nn.Module):
    """The frozen position table (`base`) read P positions on: the real tokens come after the P virtual ones."""

    method = "prefix"

    def __init__(self, base, prefix):
        super().__init__()
        self.base, self.prefix = base, prefix

    def forward(self, positions):
        positions = positions + self.prefix.num_virtual_tokens
        if positions.numel() and int(positions.max()) >= self.base.num_embeddings:
            raise ValueError(
                f"{self.prefix.num_virtual_tokens} virtual tokens and these real ones are longer than "
                f"block_size={self.base.num_embeddings}; crop the input"
            )
        return self.base(positions)


def find_gpt(model):
    """The one model.GPT in `model` (the model itself, or e.g. a classifier's .gpt)."""
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if len(gpts) != 1:
        raise ValueError(f"prefix tuning needs exactly one model.GPT inside the model, found {len(gpts)}")
    return gpts[0]


@torch.no_grad()
def activations_of_tokens(gpt, token_ids):
    """(P, n_layer, 2, n_embd): the keys and values the frozen gpt computes for token_ids (Li & Liang §7.2's
    initialisation from real words)."""
    cache = KVCache(gpt.config.n_layer)
    gpt.hidden_states(torch.tensor([token_ids], device=gpt.transformer.wte.weight.device), kv_cache=cache)
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
    prefix = PrefixTuning(gpt.config, num_virtual_tokens, initial_prefix, hidden_size).to(weight.device, weight.dtype)
    prefix.settings = dict(
        num_virtual_tokens=num_virtual_tokens, reparameterize=reparameterize, hidden_size=hidden_size
    )
    gpt.transformer.wpe = PrefixPositions(gpt.transformer.wpe, prefix)
    for i, block in enumerate(gpt.transformer.h):
        block.attn = PrefixAttention(block.attn, prefix, i)
    wrappers = [gpt.transformer.wpe] + [block.attn for block in gpt.transformer.h]
    for wrapper in wrappers:
        wrapper.settings = prefix.settings  # one dict: bake_prefix updates it for all
    train_only(model, wrappers, trainable)
    return model


def prefix_of(model):
    """The PrefixTuning of the model's active prefix adapter, or None."""
    return next((m.prefix for m in model.modules() if isinstance(m, PrefixPositions)), None)


def prefix_parameter_count(num_virtual_tokens, n_layer, n_embd, reparameterize=False, hidden_size=512):
    """Trainable numbers: P x n_layer x 2 x n_embd directly; with the MLP, P x d + (d + 1) x h + (h + 1) x 2·L·d."""
    if not reparameterize:
        return num_virtual_tokens * n_layer * 2 * n_embd
    return num_virtual_tokens * n_embd + (n_embd + 1) * hidden_size + (hidden_size + 1) * 2 * n_layer * n_embd
