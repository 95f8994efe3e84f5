import pytest
import torch
from torch import nn

from melanoma import conv
from melanoma.conv import Conv3x3, conv3x3_weight_grad
from melanoma.models import NotebookCNN


@pytest.mark.parametrize("c_in,c_out,h,w", [(1, 4, 9, 7), (3, 8, 6, 6), (5, 2, 1, 3), (1, 16, 9, 7), (2, 18, 1, 3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_weight_grad_matches_autograd_of_conv2d(c_in, c_out, h, w, memory_format):
    x = torch.randn(2, c_in, h, w).contiguous(memory_format=memory_format)
    grad_out = torch.randn(2, c_out, h, w).contiguous(memory_format=memory_format)
    reference = nn.Conv2d(c_in, c_out, 3, padding=1)
    reference(x).backward(grad_out)
    expected = reference.weight.grad
    assert torch.allclose(conv3x3_weight_grad(x, grad_out), expected, atol=1e-5, rtol=1e-4)


def test_weight_grad_by_tap_is_exact_across_pixel_blocks(monkeypatch):
    # Blocks of 256 pixels end mid-row, so shifted windows cross block, row and image edges.
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)
    x = torch.randn(3, 4, 23, 19).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 5, 23, 19).contiguous(memory_format=torch.channels_last)
    reference = nn.Conv2d(4, 5, 3, padding=1)
    reference(x).backward(grad_out)
    assert torch.allclose(conv3x3_weight_grad(x, grad_out), reference.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_conv3x3_is_conv2d_with_the_same_gradients(input_needs_grad):
    torch.manual_seed(0)
    ours, reference = Conv3x3(3, 6), nn.Conv2d(3, 6, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 10, 12).contiguous(memory_format=torch.channels_last)
    x_ours, x_ref = x.clone().requires_grad_(input_needs_grad), x.clone().requires_grad_(input_needs_grad)
    out_ours, out_ref = ours(x_ours), reference(x_ref)
    assert torch.allclose(out_ours, out_ref, atol=1e-6)
    grad_out = torch.randn_like(out_ref)
    out_ours.backward(grad_out)
    out_ref.backward(grad_out)
    assert out_ours.grad_fn.name() != out_ref.grad_fn.name()  # the fast path really ran
    for a, b in ((ours.weight.grad, reference.weight.grad), (ours.bias.grad, reference.bias.grad)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    if input_needs_grad:
        assert torch.allclose(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


def test_notebook_cnn_keeps_plain_conv_parameter_names():
    names = set(NotebookCNN(1).state_dict())
    assert {"features.0.0.weight", "features.0.0.bias", "features.2.0.weight"} <= names
    assert isinstance(NotebookCNN(1).features[0][0], nn.Conv2d)
