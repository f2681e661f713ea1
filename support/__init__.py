"""
Support code: what the programs need and the lessons do not teach (the lesson is at the repository's root).

    files.py             atomic writes (several files renamed together), safe reading, downloads, UserError
    cli.py               the command line from a config dataclass, the settings' checks, one-line errors
    runs.py              a run's device, autocast, peak memory, id, out_dir lock, earlier files, NaN stop
    resume.py            a train.py run's checkpoints: saved together, resumed bit for bit
    checkpoints.py       what runs start from: the tiny base, GPT-2 (downloaded, checked), checkpoints, adapters, data
    optim.py             AdamW with decay on matrices only, LoRA+ groups, warmup + cosine, gradient clipping
    tokenizer.py         GPT-2's BPE (tiktoken) and the byte-level tokenizer
    classifier_files.py  what finetune_classifier.py saves and --classify loads
    corpus.py            the offline pretraining corpus: the standard library's own text
    instruction_files.py instruction datasets: the embedded set, downloads, local files, each entry checked
    instructions.py      instruction data: templates, chat, collate and packing, InstructionData
    answers.py           batched greedy answers and their scores
    sms_data.py          the SMS Spam Collection, its splits and batches, the classifier's metrics
    reports.py           logs, plots, answers scored before and after, summary.json
    export.py            python -m support.export: a run in Hugging Face's formats (PEFT, transformers' GPT-2)
    adapters.py          named adapters of every method: switching, saving and loading one
    peft_format.py       LoRA adapters to and from PEFT's format
    hf_format.py         models in transformers' GPT-2 format; the export folder that never overwrites its source
    fast_dequantize.py   opt-in faster 4-bit dequantize paths (a PyTorch byte-pair table, dequantize_kernel.c)
"""
