"""Tested numerical building blocks shared by every method file.

kernels.logprob    fused, chunked LM-head log-probs / entropy / KL / OTR expectation / OTR sampler, naive twins
kernels.engine     FusedLM: the model body once (padding-free where a probe allows), the fused head on loss rows
kernels.norm       RMSNorm with a hand-written backward, swapped into loaded models
kernels.advantage  group advantages, PPO clipped surrogate, KL estimators, loss aggregation
"""
