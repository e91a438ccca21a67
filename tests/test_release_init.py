"""Same seed, same initial weights as the published release (its Denoiser measured right after construction)."""
import json
import os

import pytest
import torch

from denoiser import Denoiser

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference",
                         "release_init_fingerprint.json")


def reference_cases():
    if not os.path.exists(REFERENCE):
        pytest.skip(f"{REFERENCE} not beside the repository")
    with open(REFERENCE) as f:
        return json.load(f)["cases"]


@pytest.mark.parametrize("case_index", [0, 1], ids=["B16-256-seed0", "B32-512-seed1"])
def test_initial_weights_equal_the_release_for_the_same_seed(make_args, case_index):
    case = reference_cases()[case_index]
    args = make_args("--model", case["model"], "--img_size", str(case["img_size"]),
                     "--class_num", str(case["class_num"]), "--attn_dropout", str(case["args"]["attn_dropout"]),
                     "--proj_dropout", str(case["args"]["proj_dropout"]), "--device", "cpu", tiny=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case["seed"])
        model = Denoiser(args)
        rand_after = torch.rand(3).tolist()
    state = model.state_dict()
    assert list(state) == list(case["params"])  # same keys, same order
    for name, ref in case["params"].items():
        t = state[name].double()
        # float64 sums of float32 values: equal weights agree to rounding (1e-9 relative); a different draw does not
        assert t.sum().item() == pytest.approx(ref["sum"], rel=1e-9, abs=1e-6), name
        assert (t * t).sum().item() == pytest.approx(ref["sumsq"], rel=1e-9, abs=1e-9), name
        assert t.flatten()[:4].tolist() == ref["head"], name
    # the generator is left where the release leaves it: what is drawn next (first label drop, first t) is the same
    assert rand_after == case["torch_rand_3_after_init"]
