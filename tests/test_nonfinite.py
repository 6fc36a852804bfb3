"""Non-finite statistics never enter a norm layer's state (issue 13): an fp16 overflow under a GradScaler, or one
NaN in a training input, is skipped, counted and warned about once, naming the layer, and training recovers."""
import warnings

import pytest
import torch
from torch import nn

from mabn import BatchNorm2d, BatchRenorm2d, CenConv2d, MABN2d
from mabn.layers import functional
from mabn.layers.functional import sequential_ema, sliding_window_mean

NAN = float("nan")


# ------------------------------------------------------------------ the masked primitives against loops
def _masked_case(seed=0, m=3, groups=5, channels=4):
    generator = torch.Generator().manual_seed(seed)
    window = torch.randn(m, channels, generator=generator)
    values = torch.randn(groups, channels, generator=generator)
    kept = torch.rand(groups, channels, generator=generator) > 0.4
    kept[:, 0] = False  # a channel with nothing kept this step
    values[~kept] = NAN
    values[1, 1] = float("inf") if not kept[1, 1] else values[1, 1]
    return window, values, kept


def test_sliding_window_mean_never_pushes_what_is_not_kept():
    window, values, kept = _masked_case()
    means, new_window = sliding_window_mean(window, values, kept)
    for c in range(values.shape[1]):
        history = list(window[:, c])
        for j in range(values.shape[0]):
            if kept[j, c]:
                history.append(values[j, c])
            torch.testing.assert_close(means[j, c], torch.stack(history[-3:]).mean(), msg=f"group {j} channel {c}")
        torch.testing.assert_close(new_window[:, c], torch.stack(history[-3:]))
    assert torch.isfinite(means).all() and torch.isfinite(new_window).all()


def test_sequential_ema_leaves_the_average_alone_for_groups_not_kept():
    _, values, kept = _masked_case(seed=1)
    average = torch.rand(values.shape[1]) + 0.5
    before, after = sequential_ema(average, values, 0.9, kept)
    for c in range(values.shape[1]):
        a = average[c]
        for j in range(values.shape[0]):
            torch.testing.assert_close(before[j, c], a, msg=f"group {j} channel {c}")
            if kept[j, c]:
                a = 0.9 * a + 0.1 * values[j, c]
        torch.testing.assert_close(after[c], a)


def test_finite_values_keep_the_plain_formulas_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    window, values, average = torch.randn(4, 6, generator=generator), torch.randn(3, 6, generator=generator), torch.rand(6)
    everything = torch.ones(3, 6, dtype=torch.bool)
    for plain, masked in zip(sliding_window_mean(window, values), sliding_window_mean(window, values, everything)):
        assert torch.equal(plain, masked)
    for plain, masked in zip(sequential_ema(average, values, 0.7), sequential_ema(average, values, 0.7, everything)):
        assert torch.equal(plain, masked)


# ------------------------------------------------------------------ one NaN in a training input
LAYERS = {
    "mabn-formal": lambda backend: MABN2d(8, buffer_size=5, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2, backend=backend),
    "mabn-classification": lambda backend: MABN2d(8, buffer_size=3, warmup="classification", renorm_warmup_iters=2, backend=backend),
    "mabn-full-statistics": lambda backend: MABN2d(8, buffer_size=3, warmup_iters=2, renorm_warmup_iters=3, norm_batch_size=2,
                                                   reduced_stats=False, backend=backend),
    "bn-b=2": lambda backend: BatchNorm2d(8, norm_batch_size=2, backend=backend),
    "bn-b=2-cumulative": lambda backend: BatchNorm2d(8, momentum=None, norm_batch_size=2, backend=backend),
    "brn-b=2": lambda backend: BatchRenorm2d(8, warmup_steps=1, r_max_steps=3, d_max_steps=3, norm_batch_size=2, backend=backend),
}
# the fused graphs are those test_fused.py compiles (same layer options), so that a whole-suite run compiles them once
FUSED_CASES = ["mabn-formal", "bn-b=2", "brn-b=2"]


def _poisoned_run(layer, steps=12, poisoned_step=4):
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x = torch.randn(8, 8, 5, 5, generator=generator) + 0.3
            if step in (poisoned_step, poisoned_step + 2):
                x[3, 2, 1, 1] = NAN  # one value: sample 3 (group 1 of b=2), channel 2
            x.requires_grad_()
            y = layer(x)
            y.backward(torch.randn(8, 8, 5, 5, generator=generator))
        clean = torch.randn(8, 8, 5, 5, generator=generator)
        train_out = layer(clean)
    layer.eval()
    return train_out, layer(clean), [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("backend,case", [("reference", case) for case in LAYERS] + [("fused", case) for case in FUSED_CASES])
def test_one_nan_in_an_input_does_not_poison_the_state(backend, case):
    layer = LAYERS[case](backend)
    train_out, eval_out, warned = _poisoned_run(layer)
    assert torch.isfinite(train_out).all() and torch.isfinite(eval_out).all()
    for name, buffer in layer.state_dict().items():
        if buffer.is_floating_point():
            assert torch.isfinite(buffer).all(), name
    assert layer.num_nonfinite_skipped.item() > 0
    assert "num_nonfinite_skipped" not in layer.state_dict()  # checkpoints keep their keys
    assert len(warned) == 1, [str(w.message) for w in warned]  # once per layer, though it happened twice
    kind = type(layer).__name__
    assert str(warned[0].message).startswith(f"{kind}(8") and "non-finite normalization statistic(s)" in str(warned[0].message)


def _state_after_poisoned_run(layer):
    train_out, eval_out, _ = _poisoned_run(layer)
    return [train_out, eval_out, *layer.state_dict().values(), layer.num_nonfinite_skipped]


@pytest.mark.parametrize("backend,case", [("reference", case) for case in LAYERS] + [("fused", "mabn-formal")])
def test_both_policies_of_the_rule_give_the_same_numbers(monkeypatch, backend, case):
    """The CPU runs one branch of the rule (functional.branches_on_flags); an accelerator computes both and picks
    one on the device. Here both run on the CPU, over steps with and without a NaN: the same numbers bit for bit."""
    on_host = _state_after_poisoned_run(LAYERS[case](backend))
    asked = []
    monkeypatch.setattr(functional, "branches_on_flags", lambda device: asked.append(device) or False)
    on_device = _state_after_poisoned_run(LAYERS[case](backend))
    assert asked  # the accelerator's policy ran (the fused graphs were traced again under it)
    assert len(on_host) == len(on_device)
    for a, b in zip(on_host, on_device):
        assert torch.equal(a, b)


def test_the_skipped_channel_keeps_its_statistics_and_the_others_move_on():
    """MABN's windows and EMA after a NaN in channel 2 of one group: that (group, channel) is as if never seen."""
    torch.manual_seed(0)
    layer, twin = (MABN2d(4, buffer_size=3, warmup_iters=1, renorm_warmup_iters=1, norm_batch_size=2, backend="reference") for _ in range(2))
    x = torch.randn(4, 4, 3, 3)
    layer(x)
    twin(x)
    poisoned = torch.randn(4, 4, 3, 3)
    poisoned[2, 1, 0, 0] = NAN  # group 1, channel 1
    with pytest.warns(RuntimeWarning, match="MABN2d\\(4\\): 1 non-finite"):
        layer(poisoned)
    twin(poisoned[:2])  # the same step with group 0 only: group 1 never happened ...
    torch.testing.assert_close(layer.window_var[:, 1], twin.window_var[:, 1])  # ... for channel 1
    torch.testing.assert_close(layer.running_var[1], twin.running_var[1])
    assert not torch.equal(layer.window_var[:, 0], twin.window_var[:, 0])  # channel 0 took both groups
    assert layer.num_nonfinite_skipped.item() == 1


def test_the_warning_names_the_layer_by_its_place_in_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Identity(), MABN2d(4, backend="reference")))
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = NAN
    with pytest.warns(RuntimeWarning, match=r"MABN2d\(4\) at '1\.1': 4 non-finite normalization statistic\(s\)"):
        model(x)


# ------------------------------------------------------------------ fp16 autocast with a GradScaler
def _fp16_run(norm: str, steps: int = 60):
    """A small net trained under fp16 autocast from a loss scale of 1e12: the first steps overflow, the scaler
    skips them and halves the scale, until it fits. Returns (steps skipped, final scale, the model)."""
    torch.manual_seed(0)
    if norm == "bn":
        conv, make_norm = nn.Conv2d, nn.BatchNorm2d
    else:
        conv = CenConv2d
        def make_norm(c):
            return MABN2d(c, buffer_size=4, warmup_iters=2, renorm_warmup_iters=2, backend="reference")
    model = nn.Sequential(conv(3, 8, 3, padding=1, bias=False), make_norm(8), nn.ReLU(), conv(8, 8, 3, padding=1, bias=False),
                          make_norm(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e12)
    generator = torch.Generator().manual_seed(1)
    skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(steps):
            x, target = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(4, (4,), generator=generator)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale
    return skipped, scaler.get_scale(), model


def test_mabn_recovers_from_fp16_overflow_as_bn_does():
    bn_skipped, bn_scale, _ = _fp16_run("bn")
    mabn_skipped, mabn_scale, model = _fp16_run("mabn")
    assert 10 < bn_skipped < 40 and bn_scale > 1e3  # the scale came down to where fp16 gradients fit
    # before the fix an overflow's Inf Psi stayed in the backward window for m steps: more skips, a collapsed scale
    assert mabn_skipped <= bn_skipped + 1, (mabn_skipped, bn_skipped)
    assert bn_scale / 4 <= mabn_scale <= bn_scale * 4, (mabn_scale, bn_scale)
    for layer in (model[1], model[4]):
        assert layer.num_nonfinite_skipped.item() > 0
        assert torch.isfinite(layer.window_psi).all() and torch.isfinite(layer.running_var).all()


# ------------------------------------------------------------------ inputs the layer cannot normalize
def test_an_integer_input_is_refused_in_training_as_batchnorm_refuses_it():
    x = torch.ones(2, 4, 3, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError):
        nn.BatchNorm2d(4)(x)
    with pytest.raises(NotImplementedError, match="MABN2d: expected a floating-point input, got torch.int64"):
        MABN2d(4)(x)
