"""Helpers shared by the tests (not a test module)."""
import importlib.util
import sys

import torch
from conftest import REPO  # conftest.py is the one place that puts the repository on the import path


def load_method(name):
    """Import methods/<name>.py as a module (the method files are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"method_{name}", REPO / "methods" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and argparse look the module up by name
    spec.loader.exec_module(mod)
    return mod


def rand_batch(B=4, T=7, seed=0):
    """Random per-token log-probs (negative) and a ragged response mask (every row has >= 1 token)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.01
    lengths = torch.tensor([T, 3, 1, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp, mask
