"""peft_format.py, hf_format.py: our LoRA adapters in PEFT's format and back, checked against peft.PeftModel on GPT2LMHeadModel (a QLoRA
adapter on a bitsandbytes 4-bit base), with base weights of std 0.2 and a tolerance of 5e-5 (conftest.randomize_weights)."""

import json

import pytest
import torch
from conftest import randomize_weights

from lora import apply_lora
from model import GPT, GPTConfig
from quantize import quantize_model
from support.adapters import load_adapter, save_adapter
from support.hf_format import export_merged_hf, save_hf_checkpoint
from support.peft_format import export_peft, import_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=4, n_embd=32)


def trained_looking(model, seed=1):
    """Give every LoRA tensor non-trivial values (B starts at zero, which would make any export look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def base_model(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    return randomize_weights(GPT(config), std=0.2, seed=seed).eval()


def tokens():
    return torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


def peft_logits(hf_base_dir, adapter_dir, **from_pretrained):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_base_dir, **from_pretrained)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return model(tokens()).logits


def our_logits(model):
    with torch.no_grad():
        return model.eval()(tokens())[0]


@pytest.mark.parametrize(
    "settings",
    [
        dict(targets=("q", "v")),  # the default: c_attn with a rank-2r block construction
        dict(targets=("q",)),  # one projection: rank r, no pattern needed
        dict(
            targets="all-linear", use_rslora=True
        ),  # rank 3r on c_attn with alpha sqrt(3) alpha, and every other module
        dict(targets=("q", "k", "o", "mlp_out"), use_dora=True),  # DoRA: v's rows keep magnitude ||W0||
    ],
    ids=["lora-qv", "lora-q", "rslora-all", "dora-qko-mlpout"],
)
def test_exported_adapter_gives_peft_the_same_logits(tmp_path, settings):
    model = base_model()
    save_hf_checkpoint(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, dropout=0.1, **settings)
    trained_looking(model)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    theirs = peft_logits(tmp_path / "base", tmp_path / "peft")
    ours = our_logits(model)
    assert (ours - our_logits(base_model())).abs().max() > 1e-2  # the adapter changes the output
    assert (ours - theirs).abs().max().item() <= 5e-5


def test_export_writes_the_documented_block_construction(tmp_path):
    model = apply_lora(base_model(), rank=4, alpha=8, targets=("q", "v"))
    trained_looking(model)
    export_peft(model, tmp_path)
    from safetensors.torch import load_file

    config = json.load(open(tmp_path / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        4,
        8,
        {"attn.c_attn": 8},
        {"attn.c_attn": 16},
    )
    assert config["target_modules"] == ["attn.c_attn"] and config["fan_in_fan_out"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{p}.weight" for i in (0, 1) for p in "AB"
    ]
    attn = model.transformer.h[1].attn
    A, B = (
        tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"],
        tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"],
    )
    assert torch.equal(A, torch.cat([attn.q_proj.lora_A.weight, attn.v_proj.lora_A.weight]).detach())
    assert torch.equal(B[:32, :4], attn.q_proj.lora_B.weight.detach()) and torch.equal(
        B[64:, 4:], attn.v_proj.lora_B.weight.detach()
    )
    assert not B[:32, 4:].any() and not B[32:64].any() and not B[64:, :4].any()


def bitsandbytes_4bit(double_quant):
    """from_pretrained settings that load the HF base in bitsandbytes' NF4 (blocks of 64, fp32 compute), as PEFT's QLoRA
    users do; quantization happens as it loads, in bitsandbytes' code, from the fp32 weights."""
    pytest.importorskip("bitsandbytes")
    return dict(
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        device_map={"": "cpu"},
    )


def test_qlora_adapter_runs_in_peft_on_a_bitsandbytes_4bit_base(tmp_path):
    """Our QLoRA adapter, exported, on the fp32 base that bitsandbytes quantizes as transformers loads it: PEFT's logits
    equal ours. Without double quantization both libraries store the same 4-bit codes and scales, so the logits agree
    to float rounding; with it, bitsandbytes' CPU build rounds a few absmax scales to the second-nearest 8-bit code
    (tests/test_quantize.py), so the comparison is made without it. 64 wide: bitsandbytes' CPU path needs layers of at
    least one block per row."""
    config = GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=4, n_embd=64)
    model = base_model(config=config)
    save_hf_checkpoint(model, tmp_path / "base")  # the fp32 base, as a user has it
    quantize_model(model, double_quant=False)
    apply_lora(model, rank=4, alpha=8, targets=("q", "v", "mlp_in"))
    trained_looking(model)
    export_peft(model, tmp_path / "peft")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", **bitsandbytes_4bit(double_quant=False))
    assert type(hf.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"  # bitsandbytes' 4-bit layer, not a dense one
    for module in hf.modules():  # on a CPU with AVX512-BF16, bitsandbytes' inference kernel computes in bf16 (~1e-2
        if hasattr(module, "support_avx512bf16_for_cpu"):  # off): take its fp32 path, the one training uses
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        tokens_ = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(3))
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(tokens_).logits
        ours = model.eval()(tokens_)[0]
        without_adapter = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()(tokens_).logits
    assert (ours - without_adapter).abs().max() > 1e-1  # the adapter and the 4 bits both change the output
    assert (ours - theirs).abs().max().item() <= 5e-5


def test_qlora_adapter_merged_export_gives_the_same_logits(tmp_path):
    model = base_model()
    quantize_model(model)
    apply_lora(model, rank=4, alpha=8, targets=("q", "v"))
    trained_looking(model)
    ours = our_logits(model)
    export_merged_hf(model, tmp_path / "merged")  # the adapter merged into a dequantized copy, the model left as it was
    with torch.no_grad():
        merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(tokens()).logits
    assert (ours - merged).abs().max().item() <= 5e-5 and torch.equal(our_logits(model), ours)
    from support.adapters import disable_adapters

    disable_adapters(model)
    export_merged_hf(model, tmp_path / "base")  # the dequantized base alone: the adapter is what separates the two
    with torch.no_grad():
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()(tokens()).logits
    assert (merged - base).abs().max().item() > 1e-1


def peft_adapter(tmp_path, **lora_config):
    """A PEFT LoRA adapter with random (non-zero) weights on a random GPT-2 of our test shape, saved; returns dirs."""
    torch.manual_seed(0)
    save_hf_checkpoint(base_model(), tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(hf, peft.LoraConfig(**lora_config))
    trained_looking(model, seed=5)
    model.save_pretrained(tmp_path / "peft")  # PEFT's own
    return tmp_path / "base", tmp_path / "peft"


@pytest.mark.parametrize(
    "lora_config",
    [
        dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc"],
            use_rslora=True,
            rank_pattern={"mlp.c_fc": 2},
            alpha_pattern={"c_proj": 3},
        ),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"], use_dora=True),
    ],
    ids=["lora-c_attn", "rslora-patterns-all", "dora"],
)
def test_imported_peft_adapter_gives_the_same_logits(tmp_path, lora_config):
    base_dir, adapter_dir = peft_adapter(tmp_path, fan_in_fan_out=True, **lora_config)
    model = import_peft(GPT.from_pretrained(str(base_dir)), adapter_dir)
    assert (our_logits(model) - peft_logits(base_dir, adapter_dir)).abs().max().item() <= 5e-5


def test_import_without_patterns_is_bit_exact_and_survives_save_adapter(tmp_path):
    base_dir, adapter_dir = peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = import_peft(GPT.from_pretrained(str(base_dir)), adapter_dir)
    from safetensors.torch import load_file

    stored = load_file(adapter_dir / "adapter_model.safetensors")
    A, B = (
        stored["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"],
        stored["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
    )
    attn = model.transformer.h[0].attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(proj.lora_A.weight.detach(), A) and torch.equal(
            proj.lora_B.weight.detach(), B[32 * i : 32 * (i + 1)]
        )
    save_adapter(model, tmp_path / "ours")  # an imported adapter is an ordinary adapter of ours
    reloaded = load_adapter(GPT.from_pretrained(str(base_dir)), tmp_path / "ours")
    assert torch.equal(our_logits(reloaded), our_logits(model))


def test_export_then_import_round_trip(tmp_path):
    model = apply_lora(base_model(), rank=4, alpha=8, targets=("q", "v"), use_rslora=True)
    trained_looking(model)
    export_peft(model, tmp_path)
    back = import_peft(base_model(), tmp_path)
    assert (our_logits(back) - our_logits(model)).abs().max().item() <= 1e-5


def test_what_peft_cannot_express_is_a_clear_error(tmp_path):
    model = apply_lora(base_model(), rank=4, alpha=8, targets=("q",), trainable=("transformer.ln_f",))
    with pytest.raises(ValueError, match="transformer.ln_f.*cannot hold"):
        export_peft(model, tmp_path / "a")
    torch.manual_seed(0)
    no_bias = apply_lora(
        GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, bias=False)), rank=2, alpha=4
    )
    with pytest.raises(ValueError, match="no biases"):
        export_peft(no_bias, tmp_path / "b")
    smeared = apply_lora(
        GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, smear_keys=True)), rank=2, alpha=4
    )
    with pytest.raises(ValueError, match="smeared keys.*--no-smear_keys"):
        export_peft(smeared, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    base_dir, adapter_dir = peft_adapter(
        tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, layers_to_transform=[0]
    )
    with pytest.raises(ValueError, match="layers_to_transform"):
        import_peft(base_model(), adapter_dir)
    config = json.load(open(adapter_dir / "adapter_config.json"))
    config["layers_to_transform"] = None
    json.dump(config, open(adapter_dir / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="not in block 1"):
        import_peft(base_model(), adapter_dir)


@pytest.mark.parametrize("vocab_size", [257, 50257], ids=["byte-level", "gpt2-bpe"])
def test_save_hf_checkpoint_loads_in_hf_with_equal_logits_and_round_trips(tmp_path, vocab_size):
    torch.manual_seed(0)
    ours = randomize_weights(
        GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32))
    ).eval()
    save_hf_checkpoint(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 5e-5
    assert hf.config.eos_token_id == vocab_size - 1 and hf.config.n_positions == 64
    back = GPT.from_pretrained(str(tmp_path))
    theirs = back.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


def test_save_hf_checkpoint_refuses_what_gpt2_cannot_hold(tmp_path):
    from lora import apply_lora, merge_lora

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="bias=False"):
        save_hf_checkpoint(
            GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, bias=False)), tmp_path
        )
    model = apply_lora(GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16)), rank=2, alpha=4)
    with pytest.raises(ValueError, match="attn.q_proj is a LoRALinear.*merge"):
        save_hf_checkpoint(model, tmp_path)
    save_hf_checkpoint(merge_lora(model, unload=True), tmp_path)  # merged: fine
    with pytest.raises(ValueError, match="smeared keys"):
        save_hf_checkpoint(
            GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, smear_keys=True)), tmp_path
        )


# ---------------------------------------------------------------------------------------------------------
# issue 26: what import_peft reads is checked like every other adapter; exports are as readable as the rest


def exported_lora(tmp_path):
    model = apply_lora(base_model(), rank=4, alpha=8, targets=("q", "v"))
    trained_looking(model)
    export_peft(model, tmp_path / "peft")
    return tmp_path / "peft"


def edit_config(directory, **changes):
    config = json.load(open(directory / "adapter_config.json"))
    json.dump({**config, **changes}, open(directory / "adapter_config.json", "w"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lora_alpha="16"), "'lora_alpha' is \"16\", but must be a positive number"),
        (dict(lora_alpha=1e30), "scale its update by 2.5e\\+29, beyond any adapter trained here"),
        (dict(alpha_pattern={"(": 4}), "alpha_pattern key '\\(' is not a regular expression"),
        (dict(use_dora="false"), "'use_dora' is \"false\", but must be true or false"),
    ],
    ids=["string alpha", "absurd alpha", "bad regex", "string bool"],
)
def test_import_peft_refuses_settings_of_the_wrong_type_in_one_line(tmp_path, changes, message):
    base_dir, adapter_dir = peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    edit_config(adapter_dir, **changes)
    from support.files import UserError

    with pytest.raises(UserError, match=message):
        import_peft(base_model(), adapter_dir)


@pytest.mark.parametrize("bad", ["nan", "int32"])
def test_import_peft_refuses_tensors_that_are_not_finite_floats(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir = peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = (
        torch.full_like(tensors[name], float("nan")) if bad == "nan" else tensors[name].round().to(torch.int32)
    )
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=f"tensor '{name}' (holds NaN or infinite values|is torch.int32, but adapter weights are floating point)",
    ):
        import_peft(base_model(), adapter_dir)


def test_an_exported_pair_from_two_exports_is_refused(tmp_path):
    """export_peft's weights record the checksum of the adapter_config.json written with them."""
    first = exported_lora(tmp_path / "a")
    model = apply_lora(base_model(), rank=2, alpha=8, targets=("q",))
    trained_looking(model, seed=4)
    export_peft(model, tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").replace(first / "adapter_config.json")
    with pytest.raises(
        ValueError, match="adapter_config.json is not the config .*adapter_model.safetensors was exported with"
    ):
        import_peft(base_model(), first)


def test_exported_files_are_readable_like_the_rest(tmp_path):
    """safetensors writes its files 0600; every file an export writes gets the usual permissions (0644 under umask 022),
    as the JSON beside it does."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    save_hf_checkpoint(base_model(), tmp_path / "hf")
    exported_lora(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4 and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]
