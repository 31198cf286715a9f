"""minunet.unet.UNet: the size arithmetic of 'same' and 'valid' padding and its errors, the
architecture against the same U-Net written in PyTorch (parameter names, count, outputs,
gradients), gradients for every parameter, and the batch-norm variant."""
import json

import numpy as np
import pytest

from minunet import nn
from minunet.autograd import tensor
from minunet.unet import UNet


def test_output_sizes():
    assert UNet(depth=4, padding="valid", base_channels=1).output_size(572) == 388  # the paper's tile
    assert UNet(depth=4, padding="valid", base_channels=1).output_size((572, 572 + 16)) == (388, 388 + 16)
    assert UNet(depth=4, padding="same", base_channels=1).output_size((256, 96)) == (256, 96)
    assert UNet(depth=2, padding="valid", base_channels=1).output_size(44) == 4  # the smallest tile at depth 2


def test_sizes_that_do_not_fit_name_the_nearest_that_do():
    valid = UNet(depth=4, padding="valid", base_channels=1)
    assert valid.check_input_size(572, 572) == (388, 388)
    assert valid.nearest_input_sizes(570) == (556, 572)
    with pytest.raises(ValueError, match="input height 570 .*nearest valid input sizes: 556, 572"):
        valid.check_input_size(570, 572)
    with pytest.raises(ValueError, match="input width 573 .*nearest valid input sizes: 572, 588"):
        valid.check_input_size(572, 573)
    with pytest.raises(ValueError, match="nearest valid input sizes: 44$"):  # none below the minimum
        UNet(depth=2, padding="valid", base_channels=1).output_size(20)

    same = UNet(depth=4, padding="same", base_channels=1)
    with pytest.raises(ValueError, match="multiple of 2\\^depth = 16.*nearest valid input sizes: 96, 112"):
        same.check_input_size(100, 96)
    with pytest.raises(ValueError, match="nearest valid input sizes: 16$"):
        same.output_size(7)
    # every size the search proposes works, and nothing strictly between them does
    for s in (101, 300, 571):
        for model in (same, valid):
            near = model.nearest_input_sizes(s)
            assert all(model.output_size(n) > 0 for n in near)
            for t in range(near[0] + 1, near[-1]):
                with pytest.raises(ValueError):
                    model.output_size(t)


def test_forward_checks_its_input():
    model = UNet(in_channels=3, num_classes=2, base_channels=2, depth=2)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\).*\(1, 1, 16, 16\)"):
        model(tensor(np.zeros((1, 1, 16, 16), np.float32)))
    with pytest.raises(ValueError, match="input width 18"):
        model(tensor(np.zeros((1, 3, 16, 18), np.float32)))


def test_config_rebuilds_the_same_architecture():
    model = UNet(in_channels=3, num_classes=5, base_channels=4, depth=3, padding="valid", batch_norm=True)
    config = json.loads(json.dumps(model.config))
    assert config == dict(in_channels=3, num_classes=5, base_channels=4, depth=3, padding="valid", batch_norm=True)
    twin = UNet(**config)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="padding"):
        UNet(padding="full")


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_channel_widths_and_parameter_count_of_the_paper_model():
    model = UNet(base_channels=64, depth=4, batch_norm=False)  # 1 channel in, 2 classes: the paper's network
    conv = lambda c_in, c_out, k=3: k * k * c_in * c_out + c_out  # weight + bias
    blocks = [(1, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 512), (512, 256), (256, 128), (128, 64)]
    expected = sum(conv(a, b) + conv(b, b) for a, b in blocks)
    expected += sum(conv(c, c // 2, 2) for c in (1024, 512, 256, 128)) + conv(64, 2, 1)
    assert count(model) == expected == 31_030_658
    assert model.bottleneck[2].weight.shape == (1024, 1024, 3, 3)
    assert model.up[0].weight.shape == (1024, 512, 2, 2)
    assert model.decoder[-1][0].weight.shape == (64, 128, 3, 3)
    assert model.head.weight.shape == (2, 64, 1, 1)


def torch_unet(torch, in_channels, num_classes, base_channels, depth, padding, batch_norm):
    """The same U-Net in PyTorch, with the same module names so state_dicts line up."""
    tnn = torch.nn
    pad = 1 if padding == "same" else 0

    def block(c_in, c_out):
        layers = []
        for c in (c_in, c_out):
            layers.append(tnn.Conv2d(c, c_out, 3, padding=pad, bias=not batch_norm))
            layers += [tnn.BatchNorm2d(c_out)] if batch_norm else []
            layers.append(tnn.ReLU())
        return tnn.Sequential(*layers)

    w = [base_channels * 2 ** level for level in range(depth + 1)]

    class TorchUNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tnn.ModuleList([block(a, b) for a, b in zip([in_channels] + w[:-2], w[:-1])])
            self.pool = tnn.MaxPool2d(2)
            self.bottleneck = block(w[-2], w[-1])
            self.up = tnn.ModuleList([tnn.ConvTranspose2d(w[l + 1], w[l], 2, stride=2) for l in reversed(range(depth))])
            self.decoder = tnn.ModuleList([block(2 * w[l], w[l]) for l in reversed(range(depth))])
            self.head = tnn.Conv2d(w[0], num_classes, 1)

        def forward(self, x):
            skips = []
            for b in self.encoder:
                x = b(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, b, skip in zip(self.up, self.decoder, reversed(skips)):
                x = up(x)
                top, left = (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2
                skip = skip[:, :, top:top + x.shape[2], left:left + x.shape[3]]
                x = b(torch.cat([skip, x], 1))
            return self.head(x)

    return TorchUNet()


@pytest.mark.parametrize("padding, batch_norm, hw", [("valid", False, (44, 60)), ("same", True, (16, 24))])
def test_matches_the_same_unet_in_pytorch(padding, batch_norm, hw, rng):
    """Names, shapes and count of parameters; output and every gradient, in float64."""
    torch = pytest.importorskip("torch")
    config = dict(in_channels=2, num_classes=3, base_channels=2, depth=2, padding=padding, batch_norm=batch_norm)
    nn.manual_seed(0)
    model = UNet(**config).double()
    tmodel = torch_unet(torch, **config).double()
    assert count(model) == sum(p.numel() for p in tmodel.parameters())
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})  # strict

    x = rng.standard_normal((2, 2) + hw)
    gy_shape = (2, 3) + model.output_size(hw)
    gy = rng.standard_normal(gy_shape)
    y = model(tensor(x))
    assert y.shape == gy_shape
    y.backward(gy)
    tx = torch.tensor(x)
    ty = tmodel(tx)
    ty.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-9, atol=1e-9)
    tgrads = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), rtol=1e-8, atol=1e-9, err_msg=name)
    for name, b in tmodel.named_buffers():  # batch-norm running statistics updated alike
        np.testing.assert_allclose(model.state_dict()[name], b.numpy(), rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("padding, batch_norm", [("valid", False), ("same", True)])
def test_tiny_unet_forward_backward_reaches_every_parameter(device, padding, batch_norm, rng):
    nn.manual_seed(1)
    model = UNet(in_channels=1, num_classes=2, base_channels=4, depth=2, padding=padding,
                 batch_norm=batch_norm).to(device)
    hw = (44, 52) if padding == "valid" else (16, 8)
    x = tensor(rng.standard_normal((2, 1) + hw).astype(np.float32), device=device)
    y = model(x)
    assert y.shape == (2, 2) + model.output_size(hw) and y.dtype == np.float32 and y.device == device
    (y * y).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        g = p.grad.numpy()
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_batch_norm_eval_output_does_not_depend_on_the_batch(device, rng):
    nn.manual_seed(2)
    model = UNet(in_channels=1, num_classes=2, base_channels=2, depth=2, batch_norm=True).to(device)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d) and m is not model.head)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    run = lambda a: model(tensor(a, device=device)).numpy()  # noqa: E731
    run(x)  # one training step moves the running statistics
    model.eval()
    np.testing.assert_allclose(run(x[:1]), run(x)[:1], rtol=1e-5, atol=1e-6)
    model.train()
    assert not np.allclose(run(x[:1]), run(x)[:1], atol=1e-3)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_the_decoder_makes_no_concatenation_on_the_cpu(padding, rng):
    """Free concatenation: on the CPU the decoder blocks read [skip, up-convolved] in place (v4
    at base 8, every 3x3 layer), so a training step's forward and backward launch no concat
    kernel for it: none at all with 'same' padding, only the skips' centre crops with 'valid'."""
    import minunet
    nn.manual_seed(2)
    model = UNet(in_channels=1, num_classes=2, base_channels=8, depth=2, padding=padding, batch_norm=False)
    hw = (16, 16) if padding == "same" else (44, 44)
    x = tensor(rng.standard_normal((2, 1) + hw).astype(np.float32))
    with minunet.debug() as counts:
        (model(x) ** 2).mean().backward()
    crops = 0 if padding == "same" else model.depth
    assert counts.calls["concat_forward"] == crops and counts.calls["concat_backward"] == crops, dict(counts.calls)
    assert counts.calls["conv2d_backward_input"] > 0
