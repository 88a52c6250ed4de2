import random

import numpy as np
import pandas as pd
import torch

from tamperbench import models, suite


def test_robustness_metrics_are_seeded_and_leave_the_callers_random_states_alone():
    """CLEVER draws from the global RNGs: two calls with one seed agree, and the caller's NumPy,
    Python and torch states are what they were (a reseeded global RNG would change what the
    caller draws next)."""
    torch.manual_seed(0)
    trained = models.Trained(models.build("smallcnn", 1, 10, 28).eval())
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    y = np.arange(4)
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    first = suite.robustness_metrics(trained, x, y, n_clever=1, seed=5, device="cpu", clever_batches=2, clever_batch_size=5)
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    again = suite.robustness_metrics(trained, x, y, n_clever=1, seed=5, device="cpu", clever_batches=2, clever_batch_size=5)
    pd.testing.assert_frame_equal(first, again)
    assert set(first.metric) == {"empirical_robustness_fgsm", "loss_sensitivity", "clever_u_l2"}
