"""
The rest of the parameter-efficient family, as optional lessons beside LoRA (lora.py): each method a file that reads
top to bottom, on the same model.GPT, checked against Hugging Face's peft where peft has it.

    adapters.py       bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), and what the family shares:
                      several named adapters on one frozen base, switching between them, saving and loading one
    prefix_tuning.py  prefix tuning (Li & Liang 2021): learned keys and values per layer, a learned KV cache
    ia3.py            (IA)³ (Liu et al. 2022): learned rescaling of keys, values and MLP activations
    llama_adapter.py  LLaMA-Adapter (Zhang et al. 2023): learned prompts with their own softmax, behind a zero gate
    qlora_init.py     QLoRA started where it cancels the 4-bit error: PiSSA (Meng et al. 2024), LoftQ (Li et al. 2023)
    intrinsic.py      training in a random subspace (Li et al. 2018; Aghajanyan et al. 2020), intrinsic dimension
"""
