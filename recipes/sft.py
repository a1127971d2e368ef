"""Paper recipes of methods/sft.py, for GPU clusters (--recipe NAME; check with --dry-run). The DFT paper's SFT
baseline (arXiv 2508.05629 §4.1.1, yongliang-wu/DFT verl/train_dft.sh); spec methods_a.md §1-2

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
RECIPES = {
    "paper": dict(
        model=("Qwen/Qwen2.5-Math-1.5B", "DFT §4.1.1 main model (Table 1: also 7B, LLaMA-3.2-3B, LLaMA-3.1-8B, "
                                         "DeepSeekMath-7B)"),
        dataset=("numina_cot", "AI-MO/NuminaMath-CoT: raw problem in the chat template, solution + EOS "
                               "(numina_cot.py)"),
        num_demos=(100_000, "DFT: 100k samples; numina_cot.py --train_end 100000 takes the first 100k rows"),
        max_length=(2048, "DFT §4.1.1"),
        batch_size=(256, "DFT §4.1.1 global batch"),
        grad_accum=(8, "train_dft.sh: micro batch 4 per GPU on 8 GPUs (does not change the gradient)"),
        max_steps=(390, "DFT §4.1.1: 1 epoch of 100k at batch 256"),
        lr=(5e-5, "DFT §4.1.1 (2e-5 for LLaMA-3.1-8B); cosine, warmup ratio 0.1, AdamW (0.9, 0.95), wd 0.01: "
                  "defaults"),
        eval_dataset=("math500", "one of DFT's five benchmarks (all five: evaluate.py --setting dft)"),
        eval_size=(500, "all of MATH-500"),
        max_new_tokens=(4096, "DFT evaluation: 4096 new tokens"),
        eval_every=(100, "UNKNOWN in the sources (our choice)"),
        bf16=(True, "DFT §4.1.1: bf16 (verl FSDP keeps fp32 master weights, as --dtype float32 here)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "paper_7b": dict(base="paper", model="Qwen/Qwen2.5-Math-7B", source="DFT §4.1.1, Table 1 (lr 5e-5)"),
    "paper_llama3b": dict(base="paper", model="meta-llama/Llama-3.2-3B", source="DFT §4.1.1, Table 1 (lr 5e-5)"),
    "paper_llama8b": dict(
        source="DFT §4.1.1: lr 2e-5 for LLaMA-3.1-8B",
        base="paper",
        model="meta-llama/Llama-3.1-8B",
        lr=2e-5,
    ),
    "paper_deepseekmath": dict(
        source="DFT §4.1.1, Table 1 (lr 5e-5)",
        base="paper",
        model="deepseek-ai/deepseek-math-7b-base",
    ),
}
