import numpy as np
import pytest
import torch

from melanoma import memory, train
from melanoma.classifier import inference
from melanoma.classifier.inference import predict_proba
from melanoma.classifier.models import build_model, classifier_head
from melanoma.classifier.preprocessing import PreprocessSpec
from melanoma.config import TrainConfig
from melanoma.data.dataset import prepare_dataset, split_train_val
from melanoma.memory import GLIBC_MALLOPT_DEFAULTS, M_MMAP_MAX, M_TRIM_THRESHOLD, recycle_freed_memory
from melanoma.train import (
    SourceObjective,
    augment,
    class_weights,
    fit,
    interpolate_weights,
    make_optimizer,
    swap_colour_statistics,
    warmup_cosine,
)

SPEC = PreprocessSpec(img_size=32)


@pytest.mark.parametrize("mode", ["none", "flip", "color", "style", "full"])
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


def test_color_mode_changes_colour_not_layout():
    # Each image's brightness, contrast and saturation change by one global, increasing map:
    # sorted by brightness, the pixels before and after lie on one line (flips only permute them).
    x = torch.rand(16, 3, 8, 8) * 0.5 + 0.25
    out = augment(x, "color", torch.Generator().manual_seed(0))
    changed = 0
    for a, b in zip(x.mean(1).flatten(1), out.mean(1).flatten(1)):
        before, after = a.sort().values.numpy(), b.sort().values.numpy()
        slope, intercept = np.polyfit(before, after, 1)
        assert slope > 0 and np.abs(slope * before + intercept - after).max() < 1e-4
        changed += not np.allclose(before, after, atol=1e-3)
    assert changed >= 14
    flat = augment(torch.full((4, 3, 8, 8), 0.5), "color", torch.Generator().manual_seed(1))
    assert torch.equal(flat, flat[:, :, :1, :1].expand_as(flat))  # no rotation, crop or blur


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
    monkeypatch.setattr(memory, "glibc_mallopt", lambda: lambda param, value: calls.append((param, value)) or 1)
    with recycle_freed_memory() as active:
        assert active and calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30)]
    assert calls[2:] == list(GLIBC_MALLOPT_DEFAULTS.items())


def test_recycle_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "glibc_mallopt", lambda: None)
    with recycle_freed_memory() as active:
        assert not active
    with recycle_freed_memory(enabled=False) as active:
        assert not active


def test_class_weights_balance_the_classes():
    weights = class_weights(np.array([0] * 30 + [1] * 10))
    assert weights[1] / weights[0] == pytest.approx(3.0)


def tiny_fit(data, fit_idx, val_idx, seed, callback=None, epochs=3, patience=5, **recipe):
    torch.manual_seed(seed)
    model = build_model("cnn", 3)
    cfg = TrainConfig(model="cnn", epochs=epochs, batch_size=8, lr=3e-3, augment="full", patience=patience, seed=seed,
                      **recipe)
    result = fit(model, data.images[fit_idx], data.labels[fit_idx], data.images[val_idx], data.labels[val_idx], SPEC,
                 cfg, torch.device("cpu"), on_epoch_end=callback)
    return model, result


@pytest.fixture(scope="module")
def split(demo_root):
    data = prepare_dataset(demo_root, SPEC, use_cache=False)
    return (data, *split_train_val(data, 0.25, seed=0))


def test_fit_reports_every_epoch_and_is_reproducible(split):
    data, fit_idx, val_idx = split
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
    probs = predict_proba(model_a, data.images[val_idx], SPEC, torch.device("cpu"))
    assert probs.shape == (len(val_idx),) and np.all((probs >= 0) & (probs <= 1))
    aucs = [h["val_auc"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(aucs)) and result.best_val_auc == max(aucs)


def test_early_stopping_and_a_callback_can_stop_training(split):
    data, fit_idx, val_idx = split
    _, result = tiny_fit(data, fit_idx, val_idx, seed=0, epochs=20, patience=1)
    assert result.stopped_early and len(result.history) < 20

    def stop(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_fit(data, fit_idx, val_idx, seed=0, callback=stop)


def test_mixed_precision_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference.amp_dtype(torch.device("cuda")) == torch.float16  # an older GPU: fp16, with loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference.amp_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.amp_dtype(torch.device("cpu")) is None
    assert not train.grad_scaler(torch.device("cpu")).is_enabled()


def test_the_source_objective_is_the_weighted_mean_and_reports_each_sources_loss():
    sources = np.array(["a", "a", "b", "b"])
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])
    objective = SourceObjective(sources, weights, dro=False)
    losses = torch.tensor([1.0, 2.0, 4.0, 6.0])
    loss = objective.for_batch(torch.arange(4), torch.device("cpu"))(losses)
    assert loss.item() == pytest.approx((1 + 6 + 4 + 6) / 6)
    assert objective.epoch_metrics() == pytest.approx({"train_loss_a": 7 / 4, "train_loss_b": 5.0})
    assert objective.epoch_metrics() == {"train_loss_a": 0.0, "train_loss_b": 0.0}  # counted afresh each epoch
    assert SourceObjective(np.zeros(4), weights, dro=False).epoch_metrics() == {}  # one source: train_loss says it


def test_group_dro_moves_weight_to_the_source_with_the_higher_loss():
    sources = np.array(["a", "a", "b", "b"])
    objective = SourceObjective(sources, torch.ones(4), dro=True, step=0.5)
    losses = torch.tensor([0.2, 0.2, 1.0, 1.0], requires_grad=True)
    for _ in range(3):
        loss = objective.for_batch(torch.arange(4), torch.device("cpu"))(losses)
    q_b = objective.source_weights[1].item()
    assert q_b == pytest.approx(1 / (1 + np.exp(-3 * 0.5 * 0.8)))  # exp(step x loss) per batch, normalised
    assert loss.item() == pytest.approx((1 - q_b) * 0.2 + q_b * 1.0)
    loss.backward()  # the gradient follows the weights: source b's photos pull harder
    assert losses.grad[2].item() == pytest.approx(q_b / 2) and losses.grad[0].item() == pytest.approx((1 - q_b) / 2)
    metrics = objective.epoch_metrics()
    assert metrics["dro_weight_b"] == pytest.approx(q_b) and metrics["train_loss_b"] == pytest.approx(1.0)
    # A batch without source a moves only b's weight (a's follows by normalising).
    before = objective.source_weights.clone()
    objective.for_batch(torch.tensor([2, 3]), torch.device("cpu"))(losses[2:].detach())
    after = objective.source_weights
    assert after[1] / after[0] == pytest.approx(before[1] / before[0] * np.exp(0.5 * 1.0))
    resumed = SourceObjective(sources, torch.ones(4), dro=True)
    resumed.load_state_dict(objective.state_dict())
    torch.testing.assert_close(resumed.source_weights, objective.source_weights)


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


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(total_steps=10, warmup_steps=4)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0) and factor(7) == pytest.approx(0.5) and factor(10) == pytest.approx(0.0)
    assert warmup_cosine(10, 0)(0) == pytest.approx(1.0)


def test_the_backbone_learns_at_a_fraction_of_the_heads_rate_without_decay_on_norms():
    model = build_model("efficientnet_lite0", 3)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, backbone_lr_factor=0.1, weight_decay=0.05,
                                                  optimizer="adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)
    head = {id(p) for p in classifier_head(model).parameters()}
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 if group["name"] == "head" else 1e-4)
        assert all((id(p) in head) == (group["name"] == "head") for p in group["params"])
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim > 1 else 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_frozen_epochs_train_only_the_head(split):
    data, fit_idx, val_idx = split
    snapshots = []
    model = build_model("cnn", 3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(model="cnn", epochs=2, batch_size=8, freeze_epochs=1, patience=5)
    fit(model, data.images[fit_idx], data.labels[fit_idx], data.images[val_idx], data.labels[val_idx], SPEC, cfg,
        torch.device("cpu"), on_epoch_end=lambda e, m: snapshots.append({k: v.clone() for k, v in
                                                                          model.state_dict().items()}))
    after_frozen = snapshots[0]
    assert torch.equal(after_frozen["features.0.0.weight"], initial["features.0.0.weight"])
    assert not torch.equal(after_frozen["classifier.1.weight"], initial["classifier.1.weight"])
    assert not torch.equal(snapshots[1]["features.0.0.weight"], initial["features.0.0.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_ema_keeps_averaged_weights_that_differ_from_the_last_step(split):
    data, fit_idx, val_idx = split
    plain, _ = tiny_fit(data, fit_idx, val_idx, seed=0, epochs=1)
    averaged, result = tiny_fit(data, fit_idx, val_idx, seed=0, epochs=1, ema=0.9)
    assert result.best_epoch == 1
    assert not torch.equal(plain.features[0][0].weight, averaged.features[0][0].weight)


def test_weight_space_ensembling_mixes_the_backbone_and_keeps_the_head():
    initial = {"conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    final = {"conv.weight": torch.ones(2), "fc.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(7)}
    mixed = interpolate_weights(initial, final, alpha=0.25, head_keys={"fc.weight"})
    torch.testing.assert_close(mixed["conv.weight"], torch.full((2,), 0.25))
    torch.testing.assert_close(mixed["fc.weight"], torch.ones(2))
    assert int(mixed["bn.num_batches_tracked"]) == 7


def test_label_smoothing_reaches_the_loss():
    model = build_model("cnn", 1)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    losses = []
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model.eval()
        losses.append(train.train_step(model, optimizer, train.grad_scaler(torch.device("cpu")), x, y, None,
                                       torch.device("cpu"), smoothing)[0])
    assert losses[0] != pytest.approx(losses[1])
