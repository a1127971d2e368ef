"""Tested numerical building blocks shared by every method file.

kernels.logprob    fused, chunked LM-head log-probs / entropy / KL / OTR expectation, FusedLM
kernels.advantage  group advantages, PPO clipped surrogate, KL estimators, loss aggregation
"""
