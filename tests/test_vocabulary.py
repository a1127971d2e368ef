"""One loss vocabulary (issue 17): every `<method>_loss` takes the same leading arguments in the same order and the
same names for the same quantity; aggregation modes are the kernels' names everywhere; the log-ratio clamp is a
keyword of every rollout loss, defaulting to what each method's official code does, and a flag."""
import dataclasses
import inspect
import math
import typing

import pytest
import torch

from kernels.advantage import AGGREGATION_MODES, group_advantages, reward_moments
from tests_util import load_method

ROLLOUT = {"grpo": "grpo_loss", "chord": "chord_loss", "prefix_rft": "prefix_rft_loss", "relift": "relift_rl_loss",
           "kdrl": "kdrl_loss", "luffy": "luffy_loss", "hpt": "hpt_loss", "srft": "srft_loss", "uft": "uft_loss"}
TEACHER_FORCING = {"sft": "sft_loss", "dft": "dft_loss", "otr": "otr_loss", "relift": "relift_sft_loss"}
# the official code of each rollout method on the log-ratio clamp (spec README: verl and later Trinity-RFT clamp to
# [-20, 20]; TRL, ReLIFT, Prefix-RFT and CHORD-era Trinity-RFT do not)
CLAMP = {"grpo": 20.0, "chord": None, "prefix_rft": None, "relift": None, "kdrl": 20.0, "luffy": None, "hpt": None,
         "uft": None}  # srft.py has no importance ratio, hence no clamp
# one name per quantity: names that used to mean the same thing as another, and must not come back
RETIRED = {"kd_estimator": "kl_estimator", "alpha": "entropy_coef", "n_micro": "normalizer",
           "entropy_keep_ratio": "entropy_mask_ratio"}


def positional(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("method,name", [*ROLLOUT.items(), *TEACHER_FORCING.items()])
def test_leading_signature_and_names(method, name):
    fn = getattr(load_method(method), name)
    params = inspect.signature(fn).parameters
    lead = ["logp", "old_logp", "advantages", "mask", "normalizer"] if name in ROLLOUT.values() else \
        ["logp", "mask", "normalizer"]
    assert positional(fn) == lead  # everything after the shared leading arguments is keyword-only
    assert not set(params) & set(RETIRED), set(params) & set(RETIRED)
    if "loss_agg" in params:
        assert params["loss_agg"].default in AGGREGATION_MODES


@pytest.mark.parametrize("method", ["sft", "dft", "otr", "grpo", "chord", "prefix_rft", "relift", "kdrl",
                                    "luffy", "hpt", "srft", "uft"])
def test_loss_agg_flag_speaks_the_kernel_names(method):
    mod = load_method(method)
    hint = typing.get_type_hints(mod.Args)["loss_agg"]
    assert set(typing.get_args(hint)) <= set(AGGREGATION_MODES)
    for table in ("PRESETS", "RECIPES", "VARIANTS"):
        for entry in getattr(mod, table, {}).values():
            if isinstance(entry, dict) and "loss_agg" in entry:
                assert entry["loss_agg"] in AGGREGATION_MODES, entry["loss_agg"]
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    assert not fields & set(RETIRED)


def _rollout_loss(method, **kw):
    """One on-policy token with log(pi / pi_old) = 25 and advantage -1 (the unclipped side of PPO: loss = -A r)."""
    mod = load_method(method)
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-25.0]])
    adv, mask, z = torch.tensor([-1.0]), torch.ones(1, 1), torch.tensor(1.0)
    extra = {"grpo": {}, "relift": dict(entropy=torch.zeros(1, 1), token_normalizer=z),
             "chord": dict(is_expert=torch.tensor([False]), expert_normalizer=z, mu=0.0, dual_clip=None),
             "prefix_rft": dict(prefix_mask=torch.zeros(1, 1), entropy=torch.zeros(1, 1), token_normalizer=z,
                                dual_clip=None),
             "kdrl": dict(teacher_logp=logp, kd_mask=torch.zeros(1, 1), beta=0.0),
             "luffy": dict(prefix_mask=torch.zeros(1, 1)),
             "hpt": dict(is_expert=torch.tensor([False]), expert_normalizer=z, token_normalizer=z, entropy_coef=0.0),
             "uft": dict(ref_logp=logp, entropy=torch.zeros(1, 1))}[method]
    return float(getattr(mod, ROLLOUT[method])(logp, old, adv, mask, z, loss_agg="token_mean", **extra, **kw)[0])


@pytest.mark.parametrize("method", list(CLAMP))
def test_log_ratio_clamp_on_off_at_25_nats(method):
    """Issue 17: a clamp of +-20 was always on in relift.py and prefix_rft.py; their official code has none."""
    on, off = _rollout_loss(method, log_ratio_clamp=20.0), _rollout_loss(method, log_ratio_clamp=None)
    assert on == pytest.approx(math.exp(20), rel=1e-5) and off == pytest.approx(math.exp(25), rel=1e-5)
    default = _rollout_loss(method)
    assert default == pytest.approx(on if CLAMP[method] else off, rel=1e-5)
    args = load_method(method).Args()
    assert args.log_ratio_clamp == CLAMP[method]  # the flag's default is the loss's default


def test_optional_flags_take_none_on_the_command_line():
    import common
    grpo = load_method("grpo")
    a = common.parse_args(grpo.Args, ["--log-ratio-clamp", "none", "--dual-clip", "3"])
    assert a.log_ratio_clamp is None and a.dual_clip == 3.0
    prx = load_method("prefix_rft")
    assert common.parse_args(prx.Args, ["--dual-clip", "None"]).dual_clip is None


def test_batch_scaled_advantages_use_the_std_of_every_rank():
    """group_advantages covers batch std scaling (it was inline in every rollout main()): the moments of two ranks'
    rewards, summed as the all-reduce does, give the std of the concatenated batch."""
    g = torch.Generator().manual_seed(0)
    r0, r1 = torch.rand(8, generator=g), torch.rand(8, generator=g)
    groups = torch.arange(8) // 4
    moments = reward_moments(r0) + reward_moments(r1)
    a0 = group_advantages(r0, groups, "batch", 1e-6, batch_moments=moments)
    centred = r0 - r0.view(2, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(a0, centred / (torch.cat([r0, r1]).std() + 1e-6))
    torch.testing.assert_close(group_advantages(r0, groups, "batch", 1e-6),
                               centred / (r0.std() + 1e-6))  # without moments: this batch alone


def test_aggregate_of_a_step_without_tokens_is_zero_not_nan():
    """Found by the flag matrix: --mask-truncated with every completion truncated gave loss nan (0 / 0)."""
    grpo = load_method("grpo")
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), torch.ones(2), mask, mask.sum(), loss_agg="token_mean")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
