"""
GPT-2 in plain PyTorch, read top to bottom.

    token ids -> token + position embeddings -> n_layer x Block -> final LayerNorm -> lm_head -> logits

A Block is pre-norm attention followed by a pre-norm MLP, each added back onto the residual stream
(Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.3). Every projection
that LoRA may adapt is its own `nn.Linear` with a stable name:

    transformer.h[i].attn.q_proj   query       (n_embd -> n_embd)
    transformer.h[i].attn.k_proj   key         (n_embd -> n_embd)
    transformer.h[i].attn.v_proj   value       (n_embd -> n_embd)
    transformer.h[i].attn.o_proj   attn output (n_embd -> n_embd)
    transformer.h[i].mlp.fc_in     MLP up      (n_embd -> 4 n_embd)
    transformer.h[i].mlp.fc_out    MLP down    (4 n_embd -> n_embd)

OpenAI's checkpoint fuses q, k and v into one `c_attn` and stores weights transposed (a "Conv1D");
`GPT.from_pretrained` undoes both in a few lines (hf_to_ours).

One option departs from GPT-2, for small models trained briefly: `smear_keys` (off for OpenAI's weights, on for the
tiny base that train.py pretrains) mixes each attention key with the previous position's, which lets the model learn
to copy from its context within minutes (CausalSelfAttention.smear).

Two training aids live in the forward pass: `segment_ids` lets one row hold several packed examples that cannot
see each other, and `gradient_checkpointing` trades compute for activation memory. This file imports only torch
(and safetensors to read OpenAI's weights); the programs' plumbing is in support/.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position table covers
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    smear_keys: bool = False  # mix each key with the previous position's key (see CausalSelfAttention.smear)


class KVCache:
    """Keys and values of every token already processed, one (k, v) pair per layer.

    Generating token t+1 only needs the new token's query against all earlier keys and values;
    keeping them means each step costs O(T) instead of recomputing the whole O(T^2) prefix."""

    def __init__(self, n_layer):
        self.keys = [None] * n_layer
        self.values = [None] * n_layer

    def __len__(self):
        return self.length(-1)  # the last layer is updated last, so it never counts a half-done step

    def length(self, layer):
        return 0 if self.keys[layer] is None else self.keys[layer].size(2)

    def update(self, layer, k, v):
        """Append this step's (B, n_head, T, head_size) keys and values; return all of them."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(QK^T / sqrt(d_k)) V, where each position sees
    only itself and the positions before it (Vaswani et al. 2017, §3.2)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # one mixing logit per head; sigmoid(0) = 1/2 starts each key as the mean of its own and its predecessor's
        self.key_smear = nn.Parameter(torch.zeros(config.n_head)) if config.smear_keys else None

    def smear(self, k, starts):
        """Smeared keys (Olsson et al. 2022, "In-context Learning and Induction Heads", §"smeared keys"):
        key_t <- a * key_t + (1 - a) * key_{t-1}, with a = sigmoid(logit) learned per head. A key that also says
        which token came *before* its position lets a single attention layer find "the position after the last
        time the current token occurred" and copy what stands there: an induction head without the two-layer
        circuit that a plain transformer must first discover. k: (B, n_head, T, head_size) keys of every
        position so far; starts: (B or 1, 1, T, 1) True where a sequence begins (nothing before it to mix in)."""
        previous = F.pad(k, (0, 0, 1, 0))[:, :, :-1].masked_fill(starts, 0.0)
        a = torch.sigmoid(self.key_smear).view(1, -1, 1, 1)
        return a * k + (1 - a) * previous

    def forward(self, x, kv_cache=None, attn_mask=None, starts=None):
        """attn_mask: optional (B, 1, T, past + T) booleans, True where new position t may attend to position s
        (packed rows, left-padded prompts); it replaces the plain causal mask. starts: see smear."""
        B, T, C = x.shape
        # (B, T, C) -> (B, n_head, T, head_size): each head attends in its own subspace
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length(self.layer_idx)
            k, v = kv_cache.update(self.layer_idx, k, v)  # the cache keeps raw keys; smearing is recomputed below
        if self.key_smear is not None:
            if starts is None:  # one sequence per row: only its first position has no predecessor
                starts = torch.zeros(1, 1, k.size(2), 1, dtype=torch.bool, device=k.device)
                starts[:, :, 0] = True
            k = self.smear(k, starts)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:  # packed examples (or a prompt after filler): causal within each, nothing across
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif past == 0:  # plain causal attention over the T new tokens
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new token may look at everything in the cache
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new tokens after a cached prefix: new token i sees the past and new tokens <= i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: up to 4x width, GELU, back down (Vaswani et al. §3.3)."""

    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU; the exact erf form differs by ~1e-3
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x), approximate="tanh")))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): GPT-2 moved LayerNorm to each sub-block's input."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None, starts=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask, starts)
        x = x + self.mlp(self.ln_2(x))
        return x


PRETRAINED = {  # name -> (n_layer, n_head, n_embd); all share block_size 1024 and vocab 50257
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 355M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): reading a token in and writing it out share one matrix.
        self.transformer.wte.weight = self.lm_head.weight
        # Recompute each block's activations in backward instead of keeping them (see hidden_states).
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 §2.3: scale the init of layers that write into the residual stream by 1/sqrt(N),
        # N = 2 n_layer residual additions, so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, kv_cache=None, segment_ids=None):
        """(B, T) token ids -> (B, T, n_embd) final-LayerNorm outputs, the input to any head.

        segment_ids: optional (B, T) integers naming the example each position belongs to, when several examples
        are packed into one row (each example one contiguous run). Positions then restart at 0 for every example
        and attention is causal within an example and blocked across examples (a block-diagonal causal mask),
        so each example is computed exactly as if it were alone in its row. With a KV cache they name the cached
        positions too, (B, past + T): left-padded prompts are generated so (generate's left_padding).

        With `self.gradient_checkpointing` set, training keeps only each block's input and recomputes the block's
        activations during backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activation
        memory per block drops to one (B, T, n_embd) tensor for about one extra forward pass. The non-reentrant
        variant (torch.utils.checkpoint, use_reentrant=False) works when the block's inputs need no gradient, as
        with frozen embeddings under LoRA, and replays the RNG state, so dropout masks are the same in the
        recomputation and the gradients equal those of the plain run."""
        B, T = idx.shape
        past = len(kv_cache) if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size - past} tokens or use a model with a larger "
                f"block_size"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        attn_mask = starts = None
        if segment_ids is not None:  # with a KV cache: the ids of the cached positions too, then the T new ones
            if segment_ids.shape != (B, past + T):
                raise ValueError(
                    f"segment_ids has shape {tuple(segment_ids.shape)}; it names every position, the "
                    f"{past} cached ones too: ({B}, {past + T})"
                )
            pos, attn_mask = segment_positions_and_mask(segment_ids, first=past)  # the mask's rows: the new positions
            starts = (pos == 0)[:, None, :, None]  # every packed example starts afresh (keys of all positions)
            pos = pos[:, past:]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, None, attn_mask, starts, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask, starts)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None, segment_ids=None):
        """(B, T) token ids -> (logits, loss). Without targets: the logits (B, T, vocab_size) of every position, and
        loss None. With targets (B, T): the mean cross-entropy of predicting targets[:, t] from idx[:, :t+1] over the
        positions whose target is not -100 (padding, and a prompt left out of the loss), and logits None: only those
        positions reach lm_head, whose matmul is GPT-2's largest and whose B x T x vocab output a step's largest tensor,
        and on instruction data most positions have no target. segment_ids: see hidden_states."""
        x = self.hidden_states(idx, kv_cache, segment_ids)
        if targets is None:
            return self.lm_head(x), None
        has_target = targets != -100
        logits = self.lm_head(x[has_target])  # (N, vocab_size): the N positions with a target
        return None, F.cross_entropy(logits.float(), targets[has_target])  # NaN when no position has a target

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        use_cache=True,
        generator=None,
        left_padding=None,
    ):
        """Extend each row of idx (B, T) by up to max_new_tokens sampled tokens. temperature=0 is greedy.
        With eos_token_id, a row that emits it stops (later positions repeat eos) and generation ends
        once every row has. The KV cache gives the same tokens as recomputing the whole prefix.
        left_padding: optional (B,) count of filler tokens before each row's prompt, so prompts of different lengths
        share a batch: the filler is a segment of its own (see hidden_states), unseen by the prompt, whose positions
        start at 0 after it, as if it were alone."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        segment_ids = None
        if left_padding is not None:  # 0 = filler, 1 = the prompt and everything generated after it
            segment_ids = (torch.arange(idx.size(1), device=idx.device) >= left_padding[:, None]).long()
        new_tokens = idx
        for _ in range(max_new_tokens):
            if cache is not None and len(cache) + new_tokens.size(1) > self.config.block_size:
                cache = None  # the window has to slide: positions shift, so the cache is no longer valid
            context = idx[:, -self.config.block_size :] if cache is None else new_tokens
            segments = None if segment_ids is None else segment_ids[:, -self.config.block_size :]  # all with a cache
            # only the last position's logits choose the next token: skip lm_head's vocab-wide matmul for the rest
            logits = self.lm_head(self.hidden_states(context, kv_cache=cache, segment_ids=segments)[:, -1, :])
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished[:, None], torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token[:, 0] == eos_token_id
            idx = torch.cat([idx, next_token], dim=1)
            if segment_ids is not None:
                segment_ids = torch.cat([segment_ids, torch.ones_like(next_token)], dim=1)
            new_tokens = next_token
            if eos_token_id is not None and finished.all():
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 weights: a name in PRETRAINED (downloaded once from the Hugging Face hub) or a local
        directory holding an HF-format config.json and model.safetensors (no network). The two files are first
        checked to be a GPT-2 and to belong together (shapes read from the header: nothing is allocated for a config
        that does not match its weights)."""
        from safetensors.torch import load_file

        from support.checkpoints import check_hf_directory, download_pretrained  # plumbing: a download, the checks

        directory = download_pretrained(name_or_path) if name_or_path in PRETRAINED else name_or_path
        check_hf_directory(directory)
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
        )
        model = cls(config)
        state_dict = hf_to_ours(load_file(os.path.join(directory, "model.safetensors")), config.n_layer)
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]  # tied: HF stores it once
        model.load_state_dict(state_dict)  # strict: every tensor of ours is filled, and nothing is left over
        return model


def count_parameters(model):
    """(trainable, total) parameter counts of any model here (a GPT, a GPT with adapters, a classifier, a 4-bit
    model). Shared (tied) tensors count once, so GPT-2's lm_head counts as wte. A layer that stores its weight
    packed (quantize.Linear4bit) counts the weights it stands for, which it reports as `weight_numel`."""
    packed = sum(module.weight_numel for module in model.modules() if hasattr(module, "weight_numel"))
    total = packed + sum(p.numel() for p in model.parameters())  # a packed layer's bias is an ordinary parameter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def segment_positions_and_mask(segment_ids, first=0):
    """(B, T) segment ids of packed rows -> (B, T) positions that restart at 0 where a new segment begins, and the
    (B, 1, T - first, T) attention mask that lets position t (from `first` on: the new ones after a KV cache's) see
    position s only if s <= t and both are in one segment."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values  # index of the latest segment start
    same_segment = segment_ids[:, first:, None] == segment_ids[:, None, :]
    causal = torch.ones(T - first, T, dtype=torch.bool, device=segment_ids.device).tril(diagonal=first)
    return index - segment_start, (same_segment & causal)[:, None]


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token id per row of (B, vocab) logits.
    temperature: divide logits before softmax (<1 sharper, >1 flatter, 0 = argmax).
    top_k: keep only the k most likely tokens. top_p (nucleus sampling, Holtzman et al. 2019 §3.1):
    keep the smallest set of most-likely tokens whose probabilities sum to at least p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach p (the top token always stays)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def hf_to_ours(hf, n_layer):
    """Map an HF GPT-2 state dict onto GPT's names. HF's Conv1D stores weights as (in, out), the
    transpose of nn.Linear, and fuses q, k, v into one c_attn of width 3 n_embd."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd = {f"transformer.{k}": hf[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        h, ours = f"h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[ours + ln + ".weight"], sd[ours + ln + ".bias"] = hf[h + ln + ".weight"], hf[h + ln + ".bias"]
        q, k, v = hf[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            sd[ours + f"attn.{name}.weight"], sd[ours + f"attn.{name}.bias"] = w.contiguous(), b
        for hf_name, name in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            sd[ours + name + ".weight"] = hf[h + hf_name + ".weight"].t().contiguous()
            sd[ours + name + ".bias"] = hf[h + hf_name + ".bias"]
    return sd
