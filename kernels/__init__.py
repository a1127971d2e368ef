"""Tested numerical building blocks shared by every method file.

kernels.logprob    fused, chunked LM-head log-probs / entropy / KL / OTR expectation, FusedLM (padding-free)
kernels.norm       RMSNorm with a hand-written backward, swapped into loaded models
kernels.advantage  group advantages, PPO clipped surrogate, KL estimators, loss aggregation
"""
