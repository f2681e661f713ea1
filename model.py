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
`GPT.from_pretrained` undoes both in a few lines, and `GPT.save_pretrained` redoes them, so any model here can be
loaded by Hugging Face's `GPT2LMHeadModel`.

One option departs from GPT-2, for small models trained briefly: `smear_keys` (off for OpenAI's weights, on for the
tiny base that train.py pretrains) mixes each attention key with the previous position's, which lets the model learn
to copy from its context within minutes (CausalSelfAttention.smear).

Two training aids live in the forward pass: `segment_ids` lets one row hold several packed examples that cannot
see each other (instructions.pack_examples), and `gradient_checkpointing` trades compute for activation memory.
Given targets, forward returns only the loss, computed where a target exists and a chunk of logits at a time
(cross_entropy_at_targets): the B x T x vocab logits would be the step's largest tensor.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from common import autocast_context, download_file, save_safetensors_atomic, user_cache_dir, write_json_atomic
from quantize import Linear4bit
from safety import check_tensors_match


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
        """attn_mask: optional (B, 1, T, T) booleans, True where query t may attend to key s (packed rows); it
        replaces the plain causal mask and cannot be combined with a KV cache."""
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
        if attn_mask is not None:  # packed examples: causal within each example, nothing across them
            if kv_cache is not None:
                raise ValueError("attn_mask (packed examples) cannot be combined with a KV cache; generate one example at a time")
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
HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"


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
        # Prefix tuning (prefix_tuning.py) puts a module here that fills an empty KVCache with learned keys and
        # values, as if every sequence were preceded by that many virtual tokens. None: no prefix.
        self.prefix = None
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
        so each example is computed exactly as if it were alone in its row.

        With `self.gradient_checkpointing` set, training keeps only each block's input and recomputes the block's
        activations during backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activation
        memory per block drops to one (B, T, n_embd) tensor for about one extra forward pass. The non-reentrant
        variant (torch.utils.checkpoint, use_reentrant=False) works when the block's inputs need no gradient, as
        with frozen embeddings under LoRA, and replays the RNG state, so dropout masks are the same in the
        recomputation and the gradients equal those of the plain run."""
        B, T = idx.shape
        if self.prefix is not None and (kv_cache is None or len(kv_cache) == 0):
            kv_cache = self.prefix(B, KVCache(self.config.n_layer) if kv_cache is None else kv_cache)
        past = len(kv_cache) if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size - past} tokens or use a model with a larger block_size"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        attn_mask = starts = None
        if segment_ids is not None:
            pos, attn_mask = segment_positions_and_mask(segment_ids)
            starts = (pos == 0)[:, None, :, None]  # every packed example starts afresh
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.transformer.h:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, None, attn_mask, starts, use_reentrant=False)
            else:
                x = block(x, kv_cache, attn_mask, starts)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None, segment_ids=None):
        """Without targets: (logits, None), the logits for every position, (B, T, vocab_size).

        With targets (B, T): (None, loss), loss being the mean cross-entropy of predicting targets[:, t] from
        idx[:, :t+1] over the positions whose target is not -100. The output layer is then applied only at those
        positions, a chunk of them at a time (cross_entropy_at_targets), so no logits are returned: a B x T x vocab
        tensor would be the largest activation of the step, and most of it would belong to prompt or padding
        positions that have no target. Call forward without targets for logits. segment_ids: see hidden_states."""
        hidden = self.hidden_states(idx, kv_cache, segment_ids)
        if targets is None:
            return self.lm_head(hidden), None
        return None, cross_entropy_at_targets(hidden, self.lm_head.weight, targets)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None, use_cache=True, generator=None):
        """Extend each row of idx (B, T) by up to max_new_tokens sampled tokens. temperature=0 is greedy.
        With eos_token_id, a row that emits it stops (later positions repeat eos) and generation ends
        once every row has. The KV cache gives the same tokens as recomputing the whole prefix."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        new_tokens = idx
        for _ in range(max_new_tokens):
            if cache is not None and len(cache) + new_tokens.size(1) > self.config.block_size:
                cache = None  # the window has to slide: positions shift, so the cache is no longer valid
            context = idx[:, -self.config.block_size :] if cache is None else new_tokens
            # only the last position's logits choose the next token: skip lm_head's vocab-wide matmul for the rest
            logits = self.lm_head(self.hidden_states(context, kv_cache=cache)[:, -1, :])
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished[:, None], torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token[:, 0] == eos_token_id
            idx = torch.cat([idx, next_token], dim=1)
            new_tokens = next_token
            if eos_token_id is not None and finished.all():
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None):
        """OpenAI's GPT-2 weights: a name in PRETRAINED (downloaded once from the Hugging Face hub) or a
        local directory holding an HF-format config.json and model.safetensors (no network)."""
        from safetensors.torch import load_file

        if os.path.isdir(name_or_path):
            directory = name_or_path
        elif name_or_path in PRETRAINED:
            directory = download_pretrained(name_or_path, cache_dir)
        else:
            raise ValueError(
                f"unknown model {name_or_path!r}: use one of {', '.join(PRETRAINED)} "
                f"or a directory containing config.json and model.safetensors"
            )
        for file in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(directory, file)):
                raise FileNotFoundError(f"{directory} has no {file}; an HF GPT-2 directory needs config.json and model.safetensors")
        from safety import UserError, first_line, read_json

        config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
        shape = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
        hf = read_json(config_path, shape, what="Hugging Face GPT-2 config")
        for key in shape:
            if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] < 1:
                raise UserError(f"{config_path}: {key!r} is {json.dumps(hf[key])}, but must be a positive integer")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        try:
            weights = load_file(weights_path)
        except Exception as e:  # safetensors raises its own error type for a corrupt header or data
            raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(e)}); download or save it again") from None
        layers = {int(k.split(".")[1]) for k in (k.removeprefix("transformer.") for k in weights) if k.startswith("h.") and k.split(".")[1].isdigit()}
        if layers != set(range(config.n_layer)):  # otherwise extra layers would be dropped, or a missing one named by a bare KeyError
            raise UserError(f"{config_path} says n_layer={config.n_layer} but {weights_path} holds {len(layers)} layers "
                            f"(numbered {min(layers, default=0)}..{max(layers, default=-1)}); the two files do not belong together")
        try:
            state_dict = hf_to_ours(weights, config.n_layer)
        except KeyError as e:
            raise UserError(f"{weights_path} is not a GPT-2 checkpoint: it has no tensor {e.args[0]!r}") from None
        model = cls(config)
        model.load_weights(state_dict)
        return model

    def save_pretrained(self, directory):
        """Write this model as a Hugging Face GPT-2 checkpoint: config.json + model.safetensors with HF's names and
        Conv1D layout (the inverse of hf_to_ours), so transformers.GPT2LMHeadModel.from_pretrained(directory) and
        GPT.from_pretrained(directory) both load it. Works for GPT-2 sizes and for the byte-level models here
        (vocab 257); the end-of-text token is the last id in both vocabularies. A model with LoRA layers or 4-bit
        weights must be merged into plain nn.Linear layers first. Returns the weights file's path."""
        if not self.config.bias:
            raise ValueError("HF's GPT-2 has a bias in every Linear and LayerNorm; a model built with bias=False cannot be saved in its format")
        if self.config.smear_keys:
            raise ValueError("HF's GPT-2 has no smeared keys (smear_keys=True); this model cannot be saved in its format")
        for name, module in self.named_modules():
            if name.endswith(PROJECTIONS) and type(module) is not nn.Linear:
                raise ValueError(
                    f"{name} is a {type(module).__name__}, not a plain nn.Linear: merge first, with lora.merge_lora(model, unload=True) "
                    f"for LoRA or lora.merge_lora_into_dequantized(model) for QLoRA (train.py --export_hf does this)"
                )
        c = self.config
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,  # <|endoftext|>: 50256 for GPT-2's BPE, 256 for bytes
            "dtype": str(self.transformer.wte.weight.dtype).removeprefix("torch."),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in ours_to_hf(self.state_dict(), c.n_layer).items()}
        os.makedirs(directory, exist_ok=True)
        write_json_atomic(hf_config, os.path.join(directory, "config.json"))
        weights_path = os.path.join(directory, "model.safetensors")
        save_safetensors_atomic(tensors, weights_path, metadata={"format": "pt"})
        return weights_path

    def load_weights(self, state_dict):
        """load_state_dict that names the first missing, unexpected or wrongly shaped tensor."""
        ours = self.state_dict()
        ours.pop("lm_head.weight")  # tied to transformer.wte.weight
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        check_tensors_match(state_dict, ours, "the checkpoint")
        self.load_state_dict(state_dict, strict=False)


def count_parameters(model):
    """(trainable, total) parameter counts of any model here (a GPT, a GPT with adapters, a classifier, a 4-bit
    model). Shared (tied) tensors count once, so GPT-2's lm_head counts as wte; a 4-bit layer counts the
    in x out weights it stands for (plus bias), not the bytes its packed storage takes."""
    total, quantized = 0, set()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            quantized.update(id(p) for p in module.parameters())
    total += sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@torch.no_grad()
def mean_token_loss(model, batches, device):
    """Mean cross-entropy per target token of a language model over (inputs, targets) batches, targets -100 left
    out (in nats; per byte for the byte tokenizer). The model is put back in training mode afterwards."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device):
            logits, _ = model(x)
        n = (y != -100).sum().item()
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + n
    model.train()
    if count == 0:
        raise ValueError("no target tokens to evaluate on: an empty split, or every target masked")
    return total / count


LOSS_CHUNK_ELEMENTS = 2**24  # most logits cross_entropy_at_targets computes at once: 64 MiB in fp32, 333 rows of GPT-2's vocabulary


def cross_entropy_at_targets(hidden, weight, targets, chunk_elements=None):
    """Mean cross-entropy of the logits hidden @ weight^T against targets, over the positions whose target is not
    -100; equal to F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100) (NaN if no position has a target).

    hidden (..., n_embd), targets (...) of the same leading shape, weight (vocab, n_embd) the output layer. Two savings
    over computing every logit: positions without a target (a masked prompt, padding) never reach the output layer,
    whose vocab x n_embd matmul is GPT-2's largest, and the rest go through it in chunks of at most chunk_elements
    logits (default LOSS_CHUNK_ELEMENTS), so only one chunk of logits exists at a time. When a gradient is wanted,
    LinearCrossEntropy computes it chunk by chunk in the forward pass, so backward keeps no logits either. The chunks
    are as few as that allows and of equal size: each chunk's matmul reads all of `weight` (154 MB for GPT-2), and
    matmuls of few rows are inefficient (20-row chunks made GPT-2's loss 2x slower than 256-row ones)."""
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]  # (N, n_embd), (N,): the positions that have a target
    chunks = max(1, math.ceil(targets.numel() * weight.size(0) / (chunk_elements or LOSS_CHUNK_ELEMENTS)))
    chunk_rows = max(1, math.ceil(targets.numel() / chunks))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):  # no gradient wanted (evaluation): the loss alone
        logits = (hidden[start : start + chunk_rows] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return total / targets.numel()


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over rows of cross_entropy(hidden @ weight^T, targets), with its gradients computed in forward.

    The gradient of the mean cross-entropy with respect to a row's logits is (softmax(logits) - onehot(target)) / N,
    so once a chunk's logits exist, its share of d loss / d hidden (that matrix @ weight) and of d loss / d weight
    (its transpose @ hidden) costs two matmuls, and the chunk can be freed. Backward then only scales the stored
    (N, n_embd) and (vocab, n_embd) gradients by d(whatever comes after) / d loss, which is exact because the
    gradients are linear in it. Plain autograd would instead keep every chunk's log-softmax (N x vocab floats) alive
    until backward. Liger-Kernel's "fused linear cross-entropy" is the same idea on the GPU."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        n = targets.numel()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            log_probs = torch.log_softmax((h @ weight.t()).float(), dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            grad_logits = log_probs.exp_()  # softmax, in place: d(sum of the chunk's losses) / d logits = softmax - onehot
            grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1
            del log_probs
            if grad_hidden is not None:  # the 1/n of the mean is applied to the small results, not to this chunk
                grad_hidden[rows] = (grad_logits.to(h.dtype) @ weight) / n
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight.div_(n).to(weight.dtype) if grad_weight is not None else None)
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None)


def segment_positions_and_mask(segment_ids):
    """(B, T) segment ids of packed rows -> (B, T) positions that restart at 0 where a new segment begins, and the
    (B, 1, T, T) attention mask that lets position t see position s only if s <= t and both are in one segment."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values  # index of the latest segment start
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
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


PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out")
HF_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}  # besides q, k, v -> c_attn


def ours_to_hf(sd, n_layer):
    """GPT's state dict -> HF GPT-2's names: q, k, v stacked into c_attn (rows q, then k, then v, the order hf_to_ours
    splits), every projection transposed to Conv1D's (in, out), lm_head left out (HF ties it to wte as we do)."""
    hf = {f"transformer.{k}": sd[f"transformer.{k}"] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        h, ours = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            hf[h + ln] = sd[ours + ln]
        hf[h + "attn.c_attn.weight"] = torch.cat([sd[ours + f"attn.{p}_proj.weight"] for p in "qkv"], dim=0).t()
        hf[h + "attn.c_attn.bias"] = torch.cat([sd[ours + f"attn.{p}_proj.bias"] for p in "qkv"])
        for name, hf_name in HF_NAMES.items():
            hf[h + hf_name + ".weight"] = sd[ours + name + ".weight"].t()
            hf[h + hf_name + ".bias"] = sd[ours + name + ".bias"]
    return hf


def download_pretrained(name, cache_dir=None):
    """Fetch config.json and model.safetensors of openai-community/<name> into cache_dir/<name>."""
    directory = os.path.join(cache_dir or user_cache_dir(), name)
    os.makedirs(directory, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        download_file(HF_URL.format(name=name, file=file), os.path.join(directory, file))
    return directory
