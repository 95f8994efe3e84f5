import numpy as np
import pytest
import torch

from melanoma.data import PreprocessSpec, prepare_dataset, split_train_val
from melanoma.models import build_model
from melanoma import train
from melanoma.train import (GLIBC_MALLOPT_DEFAULTS, M_MMAP_MAX, M_TRIM_THRESHOLD, augment, class_weights, fit,
                            malignant_probability, predict_logits, recycle_freed_memory, swap_colour_statistics)

SPEC = PreprocessSpec(img_size=32)


@pytest.mark.parametrize("mode", ["none", "flip", "style", "full"])
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_shape_and_range(mode, channels):
    x = torch.rand(6, channels, 32, 32)
    out = augment(x, mode, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    if mode != "none":
        assert not torch.equal(out, x)


def test_flip_mode_only_flips():
    x = torch.rand(64, 1, 8, 8)
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    for a, b in zip(x, out):
        assert any(torch.allclose(b, v, atol=1e-5) for v in (a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)))


def test_colour_swap_takes_the_partners_statistics():
    # Four flat-ish images with distinct colour statistics; every image is swapped (p=1).
    x = torch.stack([torch.rand(3, 16, 16) * 0.2 + level for level in (0.1, 0.3, 0.5, 0.7)])
    out = swap_colour_statistics(x, torch.Generator().manual_seed(0), p=1.0)
    means_in, means_out = x.mean(dim=(2, 3)), out.mean(dim=(2, 3))
    stds_in, stds_out = x.std(dim=(2, 3)), out.std(dim=(2, 3))
    for i in range(len(x)):
        j = next(k for k in range(len(x)) if torch.allclose(means_out[i], means_in[k], atol=1e-4))
        assert torch.allclose(stds_out[i], stds_in[j], atol=1e-4)
        # The structure is kept: the swapped image is an affine map of the original per channel.
        for c in range(3):
            assert torch.corrcoef(torch.stack([x[i, c].flatten(), out[i, c].flatten()]))[0, 1] > 0.999
    assert not torch.equal(out, x)


def test_recycle_freed_memory_sets_and_restores_glibc_options(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "glibc_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    with recycle_freed_memory() as active:
        assert active and calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30)]
    assert calls[2:] == list(GLIBC_MALLOPT_DEFAULTS.items())


def test_recycle_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(train, "glibc_mallopt", lambda: None)
    with recycle_freed_memory() as active:
        assert not active


def test_class_weights_balance_the_classes():
    weights = class_weights(np.array([0] * 30 + [1] * 10))
    assert weights[1] / weights[0] == pytest.approx(3.0)


def tiny_fit(data, fit_idx, val_idx, seed, callback=None, epochs=3, patience=5):
    torch.manual_seed(seed)
    model = build_model("cnn", 3)
    result = fit(model, data.images[fit_idx], data.labels[fit_idx], data.images[val_idx], data.labels[val_idx], SPEC,
                 epochs=epochs, batch_size=8, lr=3e-3, augment_mode="full", patience=patience, seed=seed,
                 device=torch.device("cpu"), on_epoch_end=callback)
    return model, result


def test_fit_reports_every_epoch_and_is_reproducible(demo_root):
    data = prepare_dataset(demo_root, SPEC)
    fit_idx, val_idx = split_train_val(data, 0.25, seed=0)
    seen = []
    model_a, result = tiny_fit(data, fit_idx, val_idx, seed=0, callback=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3]
    expected = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "val_sensitivity",
                "val_specificity", "lr", "train_images_per_s"}
    assert expected <= set(seen[0][1])
    assert seen[1][1]["lr"] < seen[0][1]["lr"]  # cosine schedule
    model_b, _ = tiny_fit(data, fit_idx, val_idx, seed=0)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b)
    probs = malignant_probability(predict_logits(model_a, data.images[val_idx], SPEC, torch.device("cpu")))
    assert probs.shape == (len(val_idx),) and np.all((probs >= 0) & (probs <= 1))
    assert result.best_epoch in (1, 2, 3)


def test_early_stopping_and_a_callback_can_stop_training(demo_root):
    data = prepare_dataset(demo_root, SPEC)
    fit_idx, val_idx = split_train_val(data, 0.25, seed=0)
    _, result = tiny_fit(data, fit_idx, val_idx, seed=0, epochs=20, patience=1)
    assert result.stopped_early and len(result.history) < 20

    def stop(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_fit(data, fit_idx, val_idx, seed=0, callback=stop)


def test_mixed_precision_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert train.amp_dtype(torch.device("cuda")) == torch.float16  # an older GPU: fp16, with loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train.amp_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.amp_dtype(torch.device("cpu")) is None
    assert not train.grad_scaler(torch.device("cpu")).is_enabled()


def test_a_loss_scaled_step_updates_like_an_unscaled_one():
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    models = []
    for scaler in (torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        torch.manual_seed(0)
        model = build_model("cnn", 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train.train_step(model, optimizer, scaler, x, y, None, torch.device("cpu"))
        models.append(model)
    for plain, scaled in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(plain, scaled)
