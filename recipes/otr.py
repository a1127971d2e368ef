"""Paper recipes of methods/otr.py, for GPU clusters (--recipe NAME; check with --dry-run). OTR (arXiv 2509.26313) has
no official code, and its training setting was not found beyond "OTR and SFT were trained using identical settings"
(reviewer 4): every optimizer value below is marked UNKNOWN and is the DFT paper's SFT setting (sft.py --recipe
paper)

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
RECIPES = {
    "paper": dict(
        model=("Qwen/Qwen2.5-Math-1.5B", "UNKNOWN (reviews: Qwen-series models only; our choice: DFT's main model)"),
        dataset=("numina_cot", "UNKNOWN (a later paper says OTR used NuminaMath-CoT; our choice: DFT's 100k)"),
        num_demos=(100_000, "UNKNOWN (our choice: DFT's first 100k rows)"),
        max_length=(2048, "UNKNOWN (our choice: DFT's)"),
        batch_size=(256, "UNKNOWN (our choice: DFT's)"),
        grad_accum=(8, "our choice: 4 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        max_steps=(390, "UNKNOWN (our choice: DFT's 1 epoch of 100k at 256)"),
        lr=(5e-5, "UNKNOWN (our choice: DFT's; same optimizer as SFT per the reviews)"),
        eval_dataset=("math500", "OTR evaluates on math (GSM8K, MATH, ...); our choice: MATH-500"),
        eval_size=(500, "all of MATH-500"),
        max_new_tokens=(4096, "UNKNOWN (our choice: DFT's evaluation length)"),
        eval_every=(100, "UNKNOWN in the sources (our choice)"),
        bf16=(True, "UNKNOWN (our choice: bf16 autocast with fp32 master weights)"),
        fsdp=(True, "our choice: FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
        num_samples=(256, "K = 256 (the paper, via two reviews)"),
        kappa=(1.3, "the paper's example value (third-party code: 1.2)"),
        beta=(-0.1, "UNKNOWN in the paper (third-party implementation: -0.1)"),
        loss_agg=("seq_mean_token_mean", "the paper's 1/T per sequence (reviews)"),
    ),
}
