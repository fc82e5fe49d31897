"""examples/minimal_mamba.py, the one-file Mamba, computes what MambaLM computes: the same weights
give the same logits (MambaLM through each of its scan implementations)."""

import importlib.util

import pytest
import torch

from helpers import CPU_SCAN_IMPLS, ROOT, perturbed
from lethe.models import MambaLM


def load_minimal():
    spec = importlib.util.spec_from_file_location("minimal_mamba", ROOT / "examples" / "minimal_mamba.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("impl", CPU_SCAN_IMPLS)
def test_same_weights_give_the_same_logits(impl):
    minimal = load_minimal()
    config = minimal.MambaConfig(vocab_size=61, d_model=48, n_layer=3, d_state=8, d_conv=3)
    torch.manual_seed(1)
    lethe = perturbed(MambaLM(vocab_size=61, d_model=48, n_layer=3, d_state=8, d_conv=3, scan_impl=impl))
    small = minimal.Mamba(config).eval()
    small.load_state_dict(lethe.state_dict())  # strict: every weight has the same name and shape
    ids = torch.randint(0, 61, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), lethe(ids), rtol=1e-4, atol=1e-4)
    greedy = small.generate(ids[:, :5], 6, temperature=0)
    with torch.no_grad():  # each greedy token is the argmax of MambaLM's logits at that point
        expected = lethe(greedy[:, :-1])[:, 4:, :61].argmax(-1)
    assert torch.equal(greedy[:, 5:], expected)
