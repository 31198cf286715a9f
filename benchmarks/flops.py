"""Work counts and shared layer shapes for the kernel benchmarks.

A convolution's cost is counted as 2 floating-point operations (a multiply and an add) per
term of its defining sum: conv2d computes N*K*Ho*Wo outputs of C*kh*kw terms each, and
conv_transpose2d scatters every one of the N*Cin*H*W inputs into Cout*kh*kw outputs. Both of a
convolution's backward passes (gradient of the input, gradient of the weight) do the same
number of multiply-adds as its forward, so they use the same count; the bias is not counted.

UNET_CONV_SHAPES holds the convolution layers of a U-Net (batch 4, 'same' padding) at sizes
a CPU can time in seconds; UNET_CONV_TRANSPOSE_SHAPES its 2x2 stride-2 up-convolutions. The
CPU and GPU benches both draw their shapes from here, so their figures compare.
"""
import math
from typing import NamedTuple


def conv2d_flops(x_shape, w_shape, y_shape):
    """2*N*K*Ho*Wo*C*kh*kw for x (N, C, H, W), w (K, C, kh, kw), y (N, K, Ho, Wo)."""
    N, K, Ho, Wo = y_shape
    _, C, kh, kw = w_shape
    return 2 * N * K * Ho * Wo * C * kh * kw


def conv_transpose2d_flops(x_shape, w_shape):
    """2*N*Cin*H*W*Cout*kh*kw for x (N, Cin, H, W), w (Cin, Cout, kh, kw)."""
    N, Cin, H, W = x_shape
    _, Cout, kh, kw = w_shape
    return 2 * N * Cin * H * W * Cout * kh * kw


def conv_min_bytes(which, x_shape, w_shape, y_shape, itemsize=4):
    """The bytes one pass of a convolution must move at least: each input read once, the output
    written once (x, w -> y; gy, w -> gx; x, gy -> gw), whatever the kernel's layout or tiling.
    FLOPs / min_bytes is the pass's arithmetic intensity: above the device's peak FLOP/s divided
    by its memory bandwidth (67 TFLOP/s / 4.8 TB/s = 14 FLOP/byte in FP32 on an H200) the pass
    can be compute-bound; below, memory-bound."""
    n = {"forward": (x_shape, w_shape, y_shape), "backward_input": (y_shape, w_shape, x_shape),
         "backward_weight": (x_shape, y_shape, w_shape)}[which]
    return itemsize * sum(math.prod(s) for s in n)


class ConvShape(NamedTuple):
    """One convolution layer: x (N, C, H, W), w (K, C, kh, kw) for conv2d or
    (Cin, Cout, kh, kw) for conv_transpose2d (transposed=True), stride and padding as (h, w)
    pairs."""
    name: str
    x_shape: tuple
    w_shape: tuple
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    transposed: bool = False

    @property
    def y_shape(self):
        return self.conv_transpose2d_y_shape if self.transposed else self.conv2d_y_shape

    @property
    def flops(self):
        """A pass's work, counted as the direct convolution's (forward = either backward)."""
        if self.transposed:
            return conv_transpose2d_flops(self.x_shape, self.w_shape)
        return conv2d_flops(self.x_shape, self.w_shape, self.conv2d_y_shape)

    @property
    def conv2d_y_shape(self):
        (N, _, H, W), (K, _, kh, kw) = self.x_shape, self.w_shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        return (N, K, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)

    @property
    def conv_transpose2d_y_shape(self):
        (N, _, H, W), (_, Cout, kh, kw) = self.x_shape, self.w_shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        return (N, Cout, (H - 1) * sh - 2 * ph + kh, (W - 1) * sw - 2 * pw + kw)


UNET_CONV_SHAPES = [
    ConvShape("in_3to64_128px", (4, 3, 128, 128), (64, 3, 3, 3)),          # the first layer
    ConvShape("top_16to16_128px", (4, 16, 128, 128), (16, 16, 3, 3)),      # base_channels=16: few channels
    ConvShape("enc1_64to64_64px", (4, 64, 64, 64), (64, 64, 3, 3)),
    ConvShape("enc2_128to128_32px", (4, 128, 32, 32), (128, 128, 3, 3)),
    ConvShape("dec_256to128_16px", (4, 256, 16, 16), (128, 256, 3, 3)),    # after a skip concatenation
    ConvShape("bottleneck_512to512_8px", (4, 512, 8, 8), (512, 512, 3, 3)),
    ConvShape("head_64to2_1x1_128px", (4, 64, 128, 128), (2, 64, 1, 1), padding=(0, 0)),  # the classifier
]

UNET_CONV_TRANSPOSE_SHAPES = [
    ConvShape("up_256to128_16px", (4, 256, 16, 16), (256, 128, 2, 2), stride=(2, 2), padding=(0, 0)),
    ConvShape("up_128to64_32px", (4, 128, 32, 32), (128, 64, 2, 2), stride=(2, 2), padding=(0, 0)),
]


def unet_layers(in_channels=1, num_classes=2, base_channels=16, depth=4, size=128, batch=4, padding="same"):
    """Every convolution of minunet.unet.UNet(in_channels, num_classes, base_channels, depth,
    padding) on a batch of `batch` size x size images, in the order the forward pass runs
    them: per level two 3x3 convolutions, the bottleneck's two, per level on the way up a 2x2
    stride-2 up-convolution and two 3x3 convolutions (the first on the skip concatenated in
    front of the up-convolution's output), and the 1x1 head. Names say where and the shape:
    "enc1.0 16->32 64px" is level 1's first convolution, from 16 to 32 channels on 64x64."""
    pad = 1 if padding == "same" else 0
    widths = [base_channels * 2 ** level for level in range(depth + 1)]
    layers, s, c = [], size, in_channels

    def block(where, c_in, c_out):
        nonlocal s
        for j, ci in enumerate((c_in, c_out)):
            layers.append(ConvShape(f"{where}.{j} {ci}->{c_out} {s}px", (batch, ci, s, s), (c_out, ci, 3, 3),
                                    (1, 1), (pad, pad)))
            s += 2 * pad - 2
    skips = []
    for level in range(depth):
        block(f"enc{level}", c, widths[level])
        skips.append(s)
        c, s = widths[level], s // 2
    block("bottom", widths[-2], widths[-1])
    for level in reversed(range(depth)):
        layers.append(ConvShape(f"up{level} {widths[level + 1]}->{widths[level]} {s}px",
                                (batch, widths[level + 1], s, s), (widths[level + 1], widths[level], 2, 2),
                                (2, 2), (0, 0), transposed=True))
        s *= 2
        block(f"dec{level}", 2 * widths[level], widths[level])
    layers.append(ConvShape(f"head {widths[0]}->{num_classes} 1x1 {s}px", (batch, widths[0], s, s),
                            (num_classes, widths[0], 1, 1), (1, 1), (0, 0)))
    return layers


# The configurations the benchmarks time (bench_train_step.py, conv_vs_torch.py): the README's
# default model on the synthetic data, the CamVid worked example, and the paper's network.
UNET_CONFIGS = {
    "base16": dict(in_channels=1, num_classes=2, base_channels=16, depth=4, size=128, batch=4, padding="same"),
    "camvid": dict(in_channels=3, num_classes=11, base_channels=32, depth=4, size=256, batch=4, padding="same"),
    "valid572": dict(in_channels=1, num_classes=2, base_channels=64, depth=4, size=572, batch=1, padding="valid"),
}
