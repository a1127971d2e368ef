"""GPPO (Klear-Reasoner, arXiv 2508.07629) as `grpo.py --preset gppo`: the preset reaches the kernel, runs end to end
on the embedded default, and `--recipe gppo --dry-run` prints the spec's numbers (methods_c.md §5). The clip mode
itself (value and gradient per region) is tested in tests/test_kernels_advantage.py."""
import json

import pytest
import torch
from conftest import run_method
from test_recipes import dry_run
from tests_util import load_method

grpo = load_method("grpo")


def test_grpo_loss_passes_the_clip_mode_to_the_kernel():
    # A > 0, ratio 2 (above 1 + eps_high) on one token: PPO gives gradient 0, GPPO -(1 + eps_high) A / normalizer
    logp = torch.tensor([[0.0, -1.0]]).requires_grad_()
    old = torch.tensor([[-0.6931471805599453, -1.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.5])
    for mode, beta_high, want in [("ppo", 1.0, 0.0), ("gppo", 1.0, -1.28 * 1.5 / 2), ("gppo", 0.5, -0.64 * 1.5 / 2)]:
        loss, _ = grpo.grpo_loss(logp, old, adv, mask, 2.0, eps_high=0.28, clip_mode=mode, gppo_beta_high=beta_high)
        (g,) = torch.autograd.grad(loss, logp)
        assert g[0, 0].item() == pytest.approx(want, rel=1e-6), mode
        assert g[0, 1].item() == pytest.approx(-1.5 / 2, rel=1e-6)  # ratio 1: inside, -A / normalizer


def test_gppo_recipe_dry_run_matches_spec():
    values, sources, _ = dry_run("grpo", "--recipe", "gppo")
    spec = dict(  # methods_c.md §5 Defaults (math script)
        preset="gppo", clip_mode="gppo", eps_low=0.2, eps_high=0.28, dual_clip=10.0, loss_agg="token_mean", beta=0.0,
        entropy_coef=0.0, gppo_beta_low=1.0, gppo_beta_high=1.0, num_generations=8, prompts_per_step=128,
        steps_per_generation=8, lr=1e-6, warmup_steps=10, weight_decay=0.1, max_grad_norm=1.0, temperature=1.0,
        top_p=1.0, max_prompt_length=4096, max_new_tokens=32768, overlong_buffer_ratio=0.0, dynamic_sampling=True,
        eval_temperature=0.6, reward="math")
    for name, want in spec.items():
        assert values[name] == want, (name, values[name], want)
    assert sources["clip_mode"].startswith("preset gppo: Klear-Reasoner")
    assert "positive_loss_coeff 0.1" in sources["preset"]  # the deviation is said
    # the preset alone (without the recipe) is Klear's loss combination
    values, sources, _ = dry_run("grpo", "--preset", "gppo")
    for name in ("clip_mode", "eps_low", "eps_high", "dual_clip", "loss_agg", "beta"):
        assert values[name] == spec[name] and sources[name].startswith("preset gppo"), name


@pytest.mark.slow
def test_gppo_preset_end_to_end(tmp_path):
    # 2 optimizer steps per rollout batch: the second sees ratio != 1, where GPPO differs from PPO
    run_method("grpo", "--preset", "gppo", "--max-steps", 2, "--prompts-per-step", 2, "--num-generations", 4,
               "--steps-per-generation", 2, "--eval-every", 0, "--eval-size", 4, "--eval-samples", 0, "--max-new-tokens", 8,
               "--output-dir", tmp_path / "out", "--quiet", "--save-every", 0, env={"OMP_NUM_THREADS": "1"})
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 2
    for r in train:
        for k in ("train/loss", "train/clip_frac_high", "train/clip_frac_low", "train/dual_clip_frac"):
            assert k in r and r[k] == r[k], k
    config = json.loads((tmp_path / "out" / "config.json").read_text())["args"]
    assert config["clip_mode"] == "gppo" and config["dual_clip"] == 10.0 and config["eps_high"] == 0.28
