"""State dicts whose norm statistics and counters are not a fresh layer's, so that what a loader copies shows."""
import torch


def randomized_statistics(state: dict, seed: int = 2) -> dict:
    """``state`` with random means, positive variances and windows, and every progress counter at 37."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=generator)
        elif key.endswith(("running_var", "window_var", "window_psi")):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith(("num_batches_tracked", "num_steps", "num_norm_batches")):
            value = torch.full_like(value, 37)
        out[key] = value
    return out
