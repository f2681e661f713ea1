"""
Support code: what the programs need and the lessons do not teach. The lesson is at the repository's root (model.py,
lora.py, quantize.py, train.py, finetune_classifier.py); nothing here is needed to understand it.

    common.py            files written atomically, downloads, device and autocast, peak memory, the command line
    safety.py            weights-only loading, the run lock, run ids, stopping on NaN, UserError (one-line errors)
    config_checks.py     the programs' settings checked before anything loads
    tokenizer.py         GPT-2's BPE (tiktoken) and the byte-level tokenizer
    corpus.py            the offline pretraining corpus: the standard library's own text
    instruction_files.py instruction datasets: the embedded set, downloads, local files, each entry checked
    instructions.py      instruction data: templates, chat, collate and packing, InstructionData
    answers.py           batched greedy answers and their scores
    sms_data.py          the SMS Spam Collection, its splits and batches, the classifier's metrics
    optim.py             AdamW with decay on matrices only, LoRA+ groups, warmup + cosine, gradient clipping
    checkpoints.py       what runs start from: the tiny base, GPT-2 (downloaded, checked), train.py's checkpoints, data
    resume.py            where a train.py run starts (fresh or --resume: every tensor, the random state), the NaN stop
    reports.py           logs, plots, answers scored before and after, summary.json
    export.py            python -m support.export: a run in Hugging Face's formats (PEFT, transformers' GPT-2)
    adapters.py          named adapters of every method: switching, saving and loading one
    classifier_files.py  what finetune_classifier.py saves and --classify loads
    peft_format.py       LoRA adapters to and from PEFT's format
    hf_format.py         models in transformers' GPT-2 format; the export folder that never overwrites its source
    fast_dequantize.py   opt-in faster 4-bit dequantize paths (a PyTorch byte-pair table, dequantize_kernel.c)
"""
