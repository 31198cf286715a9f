"""The Python API as a PyTorch user types it: x.grad is a Tensor, repr reads like PyTorch's,
sum/mean take dim=/keepdim=, view/T/permute/transpose, dtype errors that say what to do,
convolution arguments minunet does not compute refused by name, UNet()'s defaults are the
command's, and a model comes back from a `minunet train` checkpoint in one call."""
import inspect

import numpy as np
import pytest

import minunet as mn
from minunet import F, nn
from minunet.cli import main
from minunet.train import TrainConfig


# ---- 13. Tensor ---------------------------------------------------------------------------------

def test_grad_is_a_tensor_that_accumulates_and_trains():
    x = mn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    assert isinstance(x.grad, mn.Tensor) and x.grad.shape == (3,) and not x.grad.requires_grad
    assert x.grad.dtype == np.float32 and x.grad.device == "cpu"
    np.testing.assert_allclose(x.grad.numpy(), [2, 4, 6])
    (x * 2).sum().backward()  # accumulates, as in PyTorch
    np.testing.assert_allclose(x.grad, [4, 6, 8])  # NumPy takes a cpu Tensor as its array
    w = nn.Parameter(np.ones(2, np.float32))
    opt = mn.optim.SGD([w], lr=0.5)
    (w * mn.tensor([1.0, 3.0])).sum().backward()
    opt.step()
    np.testing.assert_allclose(w.numpy(), [0.5, -0.5])
    opt.zero_grad(set_to_none=False)
    assert isinstance(w.grad, mn.Tensor) and w.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"grad: a gradient of shape \(3,\) for a tensor of shape \(2,\)"):
        w.grad = np.zeros(3, np.float32)


def test_repr_reads_like_pytorch():
    assert repr(mn.tensor([1.0, 2.0, 3.0], requires_grad=True)) == "tensor([1., 2., 3.], requires_grad=True)"
    assert repr(mn.tensor([[0.123456, 2.0], [3.5, -1.0]])) == "tensor([[ 0.1235,  2.0000],\n        [ 3.5000, -1.0000]])"
    assert repr(mn.tensor([1, 2])) == "tensor([1, 2])"
    assert repr(mn.tensor(np.zeros(2))) == "tensor([0., 0.], dtype=float64)"
    assert repr(mn.tensor(2.5)) == "tensor(2.5000)"
    x = mn.tensor([1.0, 2.0], requires_grad=True)
    assert repr(x * 2) == "tensor([2., 4.], grad_fn=<MulBackward>)"


def test_repr_matches_pytorch_where_installed():
    torch = pytest.importorskip("torch")
    for values in ([1.0, 2.0, 3.0], [[0.123456, 2.0], [3.5, -1.0]], [1e-5, 1.0], 2.5, [[1, 2], [3, 4]]):
        for grad in (False, True):
            a = np.asarray(values, np.float32 if grad or np.asarray(values).dtype.kind == "f" else np.int64)
            assert repr(mn.tensor(a, requires_grad=grad)) == repr(torch.tensor(a, requires_grad=grad)), values


def test_sum_and_mean_take_dim_and_keepdim():
    a = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    x = mn.tensor(a, requires_grad=True)
    assert x.sum(dim=1, keepdim=True).shape == (2, 1, 4)
    np.testing.assert_allclose(x.sum(1).numpy(), a.sum(1))
    np.testing.assert_allclose(x.mean(dim=(0, 2)).numpy(), a.mean((0, 2)))
    np.testing.assert_allclose(x.mean(axis=-1, keepdims=True).numpy(), a.mean(-1, keepdims=True))  # NumPy names
    x.mean(dim=2).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full(a.shape, 1 / 4))
    with pytest.raises(TypeError, match="give dim or axis"):
        x.sum(dim=0, axis=1)
    with pytest.raises(ValueError, match="mean: dim 3 is out of range"):
        x.mean(dim=3)


def test_view_T_permute_transpose():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4))
    x = mn.tensor(a, requires_grad=True)
    np.testing.assert_array_equal(x.view(6, 4).numpy(), a.reshape(6, 4))
    np.testing.assert_array_equal(x.view(-1).numpy(), a.reshape(-1))
    np.testing.assert_array_equal(x.T.numpy(), a.T)
    np.testing.assert_array_equal(x.transpose(0, 2).numpy(), a.swapaxes(0, 2))
    y = x.permute(2, 0, 1)
    np.testing.assert_array_equal(y.numpy(), a.transpose(2, 0, 1))
    gy = rng.standard_normal(y.shape)
    (y * mn.tensor(gy)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), gy.transpose(1, 2, 0))  # the inverse permutation
    m = mn.tensor(a[0])
    np.testing.assert_array_equal(m.T.numpy(), a[0].T)
    with pytest.raises(ValueError, match="permute: dims"):
        x.permute(0, 1)


# ---- 14. dtypes -------------------------------------------------------------------------------------

def test_a_float64_input_to_a_float32_model_says_what_to_do():
    model = mn.UNet(base_channels=4, depth=1)
    x = mn.tensor(np.zeros((1, 1, 8, 8)))  # float64, as torch.tensor keeps a float64 array
    assert x.dtype == np.float64
    with pytest.raises(TypeError, match=r"x float64, weight float32.*x\.float\(\).*model\.double\(\)"):
        model(x)
    assert model(x.float()).dtype == np.float32
    assert model.double()(x).dtype == np.float64
    assert x.float().double().dtype == np.float64


# ---- 15. what the convolution kernels do not compute --------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda x, w: F.conv2d(x, w, dilation=2), "conv2d: dilation=2 is not supported"),
    (lambda x, w: F.conv2d(x, w, groups=2), "conv2d: groups=2 is not supported"),
    (lambda x, w: F.conv_transpose2d(x, w, dilation=(2, 1)), r"conv_transpose2d: dilation=\(2, 1\) is not supported"),
    (lambda x, w: nn.Conv2d(2, 4, 3, dilation=2), "Conv2d: dilation=2 is not supported"),
    (lambda x, w: nn.Conv2d(2, 4, 3, groups=2), "Conv2d: groups=2 is not supported"),
    (lambda x, w: nn.ConvTranspose2d(2, 4, 3, groups=2), "ConvTranspose2d: groups=2 is not supported"),
    (lambda x, w: nn.Conv2d(2, 4, 3, padding_mode="reflect"), "padding_mode='reflect' is not supported"),
])
def test_dilation_and_groups_are_refused_by_name(call, message):
    x, w = mn.tensor(np.ones((1, 2, 5, 5), np.float32)), mn.tensor(np.ones((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=message):
        call(x, w)


def test_pytorch_positional_order_of_conv2d():
    conv = nn.Conv2d(2, 4, 3, 1, 1, 1, 1, False)  # in, out, kernel, stride, padding, dilation, groups, bias
    assert conv.bias is None and conv.padding == (1, 1)
    y = F.conv2d(mn.tensor(np.ones((1, 2, 5, 5), np.float32)), conv.weight, None, 1, 1, 1, 1)
    assert y.shape == (1, 4, 5, 5)


# ---- 16. UNet() is the command's model; a model from a command's checkpoint -----------------------------

def test_unet_defaults_are_the_commands():
    defaults = {k: p.default for k, p in inspect.signature(mn.UNet).parameters.items()}
    cfg = TrainConfig()
    for name in ("base_channels", "depth", "padding", "batch_norm"):
        assert defaults[name] == getattr(cfg, name), name


def test_a_model_from_a_command_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--samples", "12", "--image-size", "32", "--base-channels", "4", "--depth", "2",
                 "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    model = mn.UNet.from_checkpoint(out / "best.safetensors")
    assert isinstance(model, mn.UNet) and not model.training
    assert model.config == dict(in_channels=1, num_classes=3, base_channels=4, depth=2, padding="same",
                                batch_norm=True)
    from minunet.checkpoint import read_checkpoint
    saved = read_checkpoint(out / "best.safetensors").model_state
    for name, a in model.state_dict().items():
        np.testing.assert_array_equal(a, saved[name], err_msg=name)
    with mn.no_grad():
        assert model(mn.tensor(np.zeros((1, 1, 32, 32), np.float32))).shape == (1, 3, 32, 32)


def test_dir_minunet_shows_no_os_or_sys():
    names = set(dir(mn))
    assert not {"os", "sys"} & names
    assert {"Tensor", "tensor", "UNet", "F", "nn", "optim", "no_grad"} <= names


def test_the_readme_shows_from_checkpoint_and_why_grad_is_a_tensor():
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "mn.UNet.from_checkpoint(" in readme and "x.grad" in readme
