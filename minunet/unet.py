"""minunet.unet: the U-Net of Ronneberger, Fischer and Brox (MICCAI 2015).

    in -> [block 0] ----------------------------------- crop+cat -> [block] -> head -> out
              | pool                                         ^ up
              [block 1] ------------------------ crop+cat -> [block]
                 | pool                               ^ up
                 ...          [bottleneck block] -----'

Level l (0 <= l < depth) of the contracting path is a block of two 3x3 convolutions, each
followed by ReLU (with BatchNorm in between when batch_norm=True), producing
base_channels * 2^l channels; a 2x2 max-pool halves the size between levels. The bottleneck
block at level `depth` has base_channels * 2^depth channels. The expanding path goes back up:
a 2x2 stride-2 transposed convolution doubles the size and halves the channels, the
contracting path's features of that level (the skip) are concatenated in front of it on the
channel axis, and a block maps the 2C channels back to C. That concatenation is never made: the
block's first convolution reads the skip and the upsampled features where they lie
(F.conv2d of a list), and writes their two gradients apart. A 1x1 convolution (the head) maps
base_channels to num_classes logits per pixel.

padding='same' pads the 3x3 convolutions by 1, so every block keeps its size and the output
is as large as the input; the input must then be divisible by 2^depth for the pooling to be
exact. padding='valid' is the paper's: no padding, each convolution trims 2 pixels, so the
skip features are larger than the upsampled ones and are center-cropped to them before the
concatenation. The output is smaller than the input (572 -> 388 at depth 4) and only some
input sizes work: every pooled size must be even and every size positive. `output_size`,
`nearest_input_sizes` and `check_input_size` do this arithmetic, and forward refuses an
input that does not fit with an error naming the nearest sizes that do.

UNet()'s defaults are the network `minunet train` trains by default: base_channels=16,
depth=3, padding='same', BatchNorm. The paper's network is
UNet(base_channels=64, depth=4, padding='valid', batch_norm=False). `UNet.from_checkpoint`
rebuilds the model a checkpoint holds (a run's best.safetensors), weights included.
"""
import numbers

from minunet import functional as F
from minunet import nn
from minunet.checkpoint import Checkpoint, check_architecture, check_finite, read_checkpoint


def _block(in_channels, out_channels, padding, batch_norm):
    """Two (3x3 conv [+ BatchNorm] + ReLU). With BatchNorm the conv has no bias: the
    normalisation subtracts the channel mean and would cancel it."""
    layers = []
    for c in (in_channels, out_channels):
        layers.append(nn.Conv2d(c, out_channels, 3, padding=padding, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net: UNet(in_channels=1, num_classes=2, base_channels=16, depth=3, padding='same', batch_norm=True),
    the defaults of `minunet train` (whose in_channels and num_classes come from the data).

    forward maps x (N, in_channels, H, W) to logits (N, num_classes, Ho, Wo), with (Ho, Wo) =
    output_size((H, W)).
    """

    def __init__(self, in_channels=1, num_classes=2, base_channels=16, depth=3, padding="same", batch_norm=True):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("base_channels", base_channels), ("depth", depth)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"UNet: {name} must be a positive int, got {v!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"UNet: padding must be 'same' or 'valid', got {padding!r}")
        self._config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                            depth=depth, padding=padding, batch_norm=bool(batch_norm))
        self.in_channels, self.num_classes, self.depth, self.padding = in_channels, num_classes, depth, padding
        pad = 1 if padding == "same" else 0
        widths = [base_channels * 2 ** level for level in range(depth + 1)]

        self.encoder = nn.ModuleList(
            _block(c_in, c_out, pad, batch_norm) for c_in, c_out in zip([in_channels] + widths[:-2], widths[:-1]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(widths[-2], widths[-1], pad, batch_norm)
        # the expanding path in the order forward uses it: deepest level first
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2) for l in reversed(range(depth)))
        self.decoder = nn.ModuleList(_block(2 * widths[l], widths[l], pad, batch_norm) for l in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The model saved in a checkpoint (e.g. runs/<timestamp>/best.safetensors), with its
        architecture and weights, on `device`, in eval mode (call .train() to train it on).
        A checkpoint with NaN or infinite weights (a diverged run) is refused. `path` may also
        be a Checkpoint that read_checkpoint has already read."""
        ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
        check_finite(ckpt)
        model = cls(**ckpt.model_config)
        check_architecture(ckpt, model)
        model.load_state_dict(ckpt.model_state)
        return model.to(device).eval()

    @property
    def config(self):
        """The constructor's keyword arguments: UNet(**model.config) builds the same architecture."""
        return dict(self._config)

    def forward(self, x):
        # x: (N, in_channels, H, W) -> y: (N, num_classes, Ho, Wo), (Ho, Wo) = output_size((H, W))
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected input of shape (N, {self.in_channels}, H, W) "
                             f"(in_channels={self.in_channels}), got {x.shape}")
        self.check_input_size(x.shape[2], x.shape[3])
        skips = []
        for block in self.encoder:
            x = block(x)            # (N, C_l, H_l, W_l)
            skips.append(x)
            x = self.pool(x)        # (N, C_l, H_l / 2, W_l / 2)
        x = self.bottleneck(x)      # (N, C_depth, ., .)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = up(x)               # (N, C_l, 2h, 2w)
            if self.padding == "valid":
                skip = F.center_crop(skip, x.shape[2:])
            x = block([skip, x])    # (N, C_l + C_l, ...) -> (N, C_l, ...): the block's first conv reads
                                    # the pair as torch.cat([skip, x], 1), never made (free concatenation)
        return self.head(x)

    # ---- size arithmetic ---------------------------------------------------------------
    def _trace(self, size):
        """The output size for one spatial input size, or None where that size does not fit."""
        if self.padding == "same":
            return size if size >= 1 and size % 2 ** self.depth == 0 else None
        for _ in range(self.depth):  # contracting path: two convs trim 4, then an exact 2x2 pool
            size -= 4
            if size < 2 or size % 2:
                return None
            size //= 2
        size -= 4                    # bottleneck
        if size < 1:
            return None
        for _ in range(self.depth):  # expanding path: up-convolution doubles, two convs trim 4
            size = 2 * size - 4
            if size < 1:
                return None
        return size

    def output_size(self, input_size):
        """The output size for an input size: an int for an int, (Ho, Wo) for (H, W)."""
        single = isinstance(input_size, numbers.Integral)
        sizes = (input_size,) if single else tuple(input_size)
        out = []
        for s in sizes:
            o = self._trace(int(s))
            if o is None:
                raise ValueError(self._size_message(int(s), "input size"))
            out.append(o)
        return out[0] if single else tuple(out)

    def nearest_input_sizes(self, size):
        """The valid input sizes nearest to `size`: (size,) if it fits, else the largest
        valid size below it (where there is one) and the smallest above it."""
        if self._trace(size) is not None:
            return (size,)
        step = 2 ** self.depth  # valid sizes repeat with this period in both modes
        below = next((s for s in range(size - 1, max(size - step, 0), -1) if self._trace(s) is not None), None)
        above = size + 1
        while self._trace(above) is None:
            above += 1
        return (above,) if below is None else (below, above)

    def check_input_size(self, H, W):
        """Raise ValueError naming the nearest valid sizes unless (H, W) fits; return (Ho, Wo)."""
        for name, s in (("height", H), ("width", W)):
            if self._trace(int(s)) is None:
                raise ValueError(self._size_message(int(s), f"input {name}"))
        return self._trace(int(H)), self._trace(int(W))

    def _size_message(self, size, what):
        if self.padding == "same":
            why = f"padding='same' needs a multiple of 2^depth = {2 ** self.depth}"
        else:
            why = ("padding='valid' needs every pooled size to be even and every feature map to "
                   "keep at least one pixel")
        nearest = ", ".join(str(s) for s in self.nearest_input_sizes(size))
        return (f"UNet(depth={self.depth}, padding={self.padding!r}): {what} {size} does not fit ({why}); "
                f"nearest valid input sizes: {nearest}")

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())
