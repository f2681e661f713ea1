"""
The rest of the parameter-efficient family, as optional lessons beside LoRA (lora.py): each method a file that reads
top to bottom, on the same model.GPT, checked against Hugging Face's peft where peft has it.

    adapters.py       bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020)
    prefix_tuning.py  prefix tuning (Li & Liang 2021): learned keys and values per layer, a learned KV cache
    ia3.py            (IA)³ (Liu et al. 2022): learned rescaling of keys, values and MLP activations
    llama_adapter.py  LLaMA-Adapter (Zhang et al. 2023): learned prompts with their own softmax, behind a zero gate
    qlora_init.py     QLoRA started where it cancels the 4-bit error: PiSSA (Meng et al. 2024), LoftQ (Li et al. 2023)
    intrinsic.py      training in a random subspace (Li et al. 2018; Aghajanyan et al. 2020), intrinsic dimension

Naming adapters, switching between them, saving and loading one: support/adapters.py, for these and for LoRA alike.
Below: the few lines every apply_* here shares.
"""

from support.adapters import adapter_layers


def layers_ending_with(model, suffixes):
    return [(n, m) for n, m in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]


def check_new_adapter(model, trainable):
    """No adapter in the model yet (add_adapter puts the active one aside first), and every `trainable` name is a
    module or parameter of the model (a typo would otherwise leave it frozen without a word). -> trainable, a tuple."""
    if adapter_layers(model):
        raise ValueError(
            "the model has an adapter already: applying a second would stack two; add another task's "
            "adapter with support.adapters.add_adapter(model, name, method, ...)"
        )
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for t in trainable:
        if not any(n == t or n.startswith(t + ".") for n in names):
            raise ValueError(f"trainable={t!r} names no module or parameter of the model")
    return trainable


def train_only(model, wrappers, trainable):
    """Freeze everything, then unfreeze the new adapter's wrappers (not their bases) and the modules named in
    `trainable`, e.g. a new classification head."""
    model.requires_grad_(False)
    for wrapper in wrappers:
        for key, p in wrapper.named_parameters():
            p.requires_grad_(not key.startswith("base."))
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name == t or name.startswith(t + ".") for t in trainable):
            p.requires_grad_(True)
