"""kernels/norm.py: the RMSNorm autograd Function against the Hugging Face modules it replaces (values, gradients,
dtypes), gradcheck in float64, and fuse_rmsnorm on real tiny models built from configs (Qwen2, Qwen3, Llama swapped
and unchanged in output; Gemma's (1 + w) norm and an eps-outside-the-root norm left alone)."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.norm import RMSNormFunction, fuse_rmsnorm, rms_norm  # noqa: E402


def hf_norm(d, eps=1e-6, dtype=torch.float32, seed=0):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    m = Qwen2RMSNorm(d, eps).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return m


def grads(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_rmsnorm_function_equals_hf_module(x_dtype, w_dtype):
    torch.manual_seed(0)
    ref = hf_norm(96, dtype=w_dtype)
    ours = copy.deepcopy(ref)
    x = (torch.randn(3, 11, 96) * 4).to(x_dtype)
    x[0, 0] *= 1e-4  # a near-zero row: eps matters
    dy = torch.randn(3, 11, 96).to(torch.promote_types(x_dtype, w_dtype))
    y_ref, dx_ref, dw_ref = grads(ref, x, ref.weight, dy)
    y, dx, dw = grads(lambda t: RMSNormFunction.apply(t, ours.weight, ref.variance_epsilon), x, ours.weight, dy)
    assert y.dtype == y_ref.dtype and dx.dtype == x_dtype and dw.dtype == w_dtype
    exact = x_dtype == torch.float32 and w_dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0)  # the forward is the same arithmetic
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)
    torch.testing.assert_close(dw.float(), dw_ref.float(), **(tol if exact else dict(rtol=2e-2, atol=0.5)))


def test_rmsnorm_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_no_grad_path_equals_function():
    x, w = torch.randn(4, 32), torch.rand(32) + 0.5
    with torch.no_grad():
        a = rms_norm(x, w, 1e-6)
    b = RMSNormFunction.apply(x.requires_grad_(), w, 1e-6)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def tiny(arch):
    """A real Hugging Face model of `arch`, randomly initialised from a config (no download)."""
    import transformers
    cfg_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                          "llama": ("LlamaConfig", "LlamaForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM")}[arch]
    cfg = getattr(transformers, cfg_cls)(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).float()
    with torch.no_grad():  # norm weights away from their init (ones, or zeros for Gemma) so a wrong formula shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 1.5)
    return model


@pytest.mark.parametrize("arch,expected", [("qwen2", 5), ("qwen3", 9), ("llama", 5), ("gemma", 0)])
def test_fuse_rmsnorm_on_real_models(arch, expected):
    ref = tiny(arch)
    model = copy.deepcopy(ref)
    assert fuse_rmsnorm(model) == expected  # 2 per layer + final (+ q_norm, k_norm in Qwen3); Gemma: (1 + w), kept
    assert fuse_rmsnorm(model) == 0  # idempotent
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding
    out_ref, out = ref(input_ids=ids, attention_mask=am).logits, model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (out_ref * am[..., None]).square().mean().backward()
    (out * am[..., None]).square().mean().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    state = copy.deepcopy(model).state_dict()  # a deep copy keeps its own (bound) forward; weights unchanged
    assert state.keys() == ref.state_dict().keys()


def test_fuse_rmsnorm_leaves_other_formulas_alone():
    class EpsOutsideRMSNorm(torch.nn.Module):
        def __init__(self, d, eps=1e-3):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            return self.weight * x / (x.square().mean(-1, keepdim=True).sqrt() + self.variance_epsilon)

    class PlainRMSNorm(EpsOutsideRMSNorm):
        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.variance_epsilon)

    net = torch.nn.Sequential(EpsOutsideRMSNorm(16), PlainRMSNorm(16))
    w0 = [p.detach().clone() for p in net.parameters()]
    assert fuse_rmsnorm(net) == 1
    assert "forward" not in net[0].__dict__ and "forward" in net[1].__dict__
    assert all(torch.equal(a, p) for a, p in zip(w0, net.parameters()))  # the probe restored the weights
