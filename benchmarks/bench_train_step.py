"""One U-Net training step (forward, cross-entropy, backward, optimizer step) in images/s:
minunet against the same network and optimizer in PyTorch, on the same device.

The PyTorch model is built layer for layer like minunet.unet.UNet (3x3 convolutions with
ReLU, 2x2 max-pool, 2x2 stride-2 transposed convolutions, skip concatenation in front of the
upsampled features, 1x1 head) and trained with the same optimizer (SGD, momentum 0.9) on the
same batch. PyTorch's TF32 switches are pinned off, so on an Ampere or later GPU both sides do
true float32 arithmetic, and on the CPU PyTorch gets as many threads as numba. The ratio
reported (`torch_ratio` in extra_info, as in bench_cpu.py) is minunet images/s divided by
PyTorch images/s, i.e. PyTorch's step time over minunet's (1.0 = as fast as PyTorch).

Before anything is timed, the loss of minunet's step at the timed configuration is checked
against the same network evaluated layer by layer with tests/reference.py in float64
(`check_step`, in the parent process, once).

Each library is timed in a process of its own (benchmarks/isolated.py), which imports numpy
first, as most scripts do (`--import-first numpy`), or the library first (`--import-first
library`). Run as a script, the two libraries alternate for --pairs rounds and the median of
the pairs' ratios is the figure. With --compare-import-order it times minunet alone instead,
alternating the two import orders, and reports numpy-first images/s over minunet-first
images/s (1.0 = the order does not matter, as it must not: importing minunet changes nothing
in the process).

--profile times minunet alone, in this process, kernel by kernel: every call of a contract kernel
(minunet.contract) timed on the wall clock, per kernel and per (kernel, shape of its first
argument), and the rest of the step (Python, autograd, NumPy outside the kernels) as one line;
then the step under cProfile, the functions that spend the most time of their own. This is
where the time goes, not a figure to compare: the timer's own cost is in it.

--config picks the network and batch among benchmarks/flops.py's UNET_CONFIGS: base16 (the
README's default model, 128x128, batch 4), camvid (3 -> 11 channels, base 32, 256x256, batch 4)
or valid572 (the paper's: base 64, 'valid' convolutions, 572x572, batch 1); the options
--base-channels etc. override its entries. A configuration whose float64 reference forward
would take minutes (more than _CHECK_GFLOP of work) is checked at the smallest input size the
same network takes, one image; benchmarks/conv_vs_torch.py checks its layers at the timed shapes.

    PYTHONPATH=. python -m pytest benchmarks/bench_train_step.py --benchmark-only
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cpu --config base16 --pairs 5
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cpu --config camvid --pairs 3 --rounds 3
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cpu --compare-import-order --pairs 5
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cpu --profile
    PYTHONPATH=. python benchmarks/bench_train_step.py --device cuda --cuda-graph --pairs 3

--cuda-graph times minunet's step captured once as a CUDA graph and replayed (minunet.cuda_graph,
as `minunet train --cuda-graph`); the replayed step also copies its batch from the host each
time, which the eager step (one batch, already on the GPU) does not.
"""
import argparse
import collections
import cProfile
import io
import json
import pathlib
import pstats
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script from a source checkout: find the package beside us
    sys.path.insert(0, str(ROOT))

# The library a process times is imported first (after numpy, unless --import-first=library),
# so that it sets up the shared native runtimes as it would alone (benchmarks/isolated.py); a
# process timing minunet never imports PyTorch.
import isolated  # noqa: E402  (beside this file: sys.path[0] for a script, rootdir/conftest for pytest)

isolated.use_cuda_emulator_if_asked()

if isolated.argv_option("--import-first", "numpy") == "numpy":
    import numpy  # noqa: F401

torch = None
if isolated.argv_option("--library") != "minunet":
    try:
        import torch
    except ImportError:
        pass

import minunet  # noqa: E402,F401
import numpy as np  # noqa: E402,F811
import pytest  # noqa: E402

from minunet import backend, contract, nn, optim  # noqa: E402
from minunet import functional as F  # noqa: E402
from minunet.autograd import tensor  # noqa: E402
from minunet.cuda_graph import CudaGraphStep  # noqa: E402
from minunet.unet import UNet  # noqa: E402

from flops import UNET_CONFIGS, unet_layers  # noqa: E402

CONFIG = dict(UNET_CONFIGS["base16"], lr=0.01, momentum=0.9)
_CONFIG_KEYS = ("in_channels", "num_classes", "base_channels", "depth", "size", "batch", "padding")
_CHECK_GFLOP = 30


def _synchronize(device):
    if device == "cuda":
        backend.xp_for("cuda").cuda.Device().synchronize()


def _batch(cfg, seed=0):
    """Images, and targets of the network's output size (smaller than the input for 'valid')."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg["batch"], cfg["in_channels"], cfg["size"], cfg["size"])).astype(np.float32)
    out = UNet(1, 2, 1, cfg["depth"], cfg["padding"]).output_size(cfg["size"])
    y = rng.integers(0, cfg["num_classes"], size=(cfg["batch"], out, out))
    return x, y


def minunet_step(cfg, device, cuda_graph=False):
    """A closure running one minunet training step on `device`; with `cuda_graph`, the step captured
    as a CUDA graph (minunet.cuda_graph: its first call is eager, its second captures), which copies
    the batch from the host into the graph's input buffers every step."""
    nn.manual_seed(0)
    model = UNet(cfg["in_channels"], cfg["num_classes"], cfg["base_channels"], cfg["depth"], cfg["padding"],
                 batch_norm=False).to(device)  # as _torch_unet: no BatchNorm
    opt = optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    x, y = _batch(cfg)
    if cuda_graph:
        graph_step = CudaGraphStep(model, opt, F.cross_entropy)

        def step():
            graph_step(x, y)
            _synchronize(device)
        return step
    x, y = tensor(x, device=device), backend.to_device(y, device)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        _synchronize(device)
    return step


def reference_loss(model, x, y):
    """The mean cross-entropy of the BatchNorm-free U-Net `model` on (x, y), layer by layer with
    tests/reference.py in float64: the check of minunet's forward pass."""
    from validate import reference as ref

    def block(seq, a):
        for m in seq:
            if isinstance(m, nn.Conv2d):
                a = ref.conv2d_forward(a, m.weight.numpy(), m.bias.numpy(), m.stride, m.padding)
            else:
                a = ref.relu_forward(a)
        return a

    skips = []
    for enc in model.encoder:
        x = block(enc, x)
        skips.append(x)
        x = ref.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0))[0]
    x = block(model.bottleneck, x)
    for up, dec, skip in zip(model.up, model.decoder, reversed(skips)):
        x = ref.conv_transpose2d_forward(x, up.weight.numpy(), up.bias.numpy(), up.stride, up.padding, (0, 0))
        top, left = (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2  # 'valid': the center
        x = block(dec, ref.concat_forward([skip, x], [(top, left), (0, 0)], x.shape[2:]))
    head = model.head
    return float(ref.cross_entropy(ref.conv2d_forward(x, head.weight.numpy(), head.bias.numpy(), (1, 1), (0, 0)), y))


def check_step(cfg):
    """minunet's loss at the timed configuration (on the CPU) against reference_loss; above
    _CHECK_GFLOP of forward work, at the smallest input the network takes, one image."""
    from validate import check
    if sum(s.flops for s in unet_layers(**{k: cfg[k] for k in _CONFIG_KEYS})) > _CHECK_GFLOP * 1e9:
        net = UNet(1, 2, 1, cfg["depth"], cfg["padding"])
        cfg = dict(cfg, batch=1, size=net.nearest_input_sizes(1)[-1])
    nn.manual_seed(0)
    model = UNet(cfg["in_channels"], cfg["num_classes"], cfg["base_channels"], cfg["depth"], cfg["padding"],
                 batch_norm=False)  # the timed network: reference_loss has no BatchNorm
    x, y = _batch(cfg)
    check(F.cross_entropy(model(tensor(x)), y).data, reference_loss(model, x, y), "U-Net train step loss")


def _torch_unet(cfg):
    tnn = torch.nn

    pad = 1 if cfg["padding"] == "same" else 0

    def block(c_in, c_out):
        return tnn.Sequential(tnn.Conv2d(c_in, c_out, 3, padding=pad), tnn.ReLU(),
                              tnn.Conv2d(c_out, c_out, 3, padding=pad), tnn.ReLU())

    def crop(skip, hw):  # the skip's center, as minunet.functional.center_crop
        top, left = (skip.shape[2] - hw[0]) // 2, (skip.shape[3] - hw[1]) // 2
        return skip[:, :, top:top + hw[0], left:left + hw[1]]

    class TorchUNet(tnn.Module):
        def __init__(self):
            super().__init__()
            widths = [cfg["base_channels"] * 2 ** level for level in range(cfg["depth"] + 1)]
            self.encoder = tnn.ModuleList(block(a, b) for a, b in zip([cfg["in_channels"]] + widths[:-2], widths[:-1]))
            self.bottleneck = block(widths[-2], widths[-1])
            levels = list(reversed(range(cfg["depth"])))
            self.up = tnn.ModuleList(tnn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2) for l in levels)
            self.decoder = tnn.ModuleList(block(2 * widths[l], widths[l]) for l in levels)
            self.head = tnn.Conv2d(widths[0], cfg["num_classes"], 1)

        def forward(self, x):
            skips = []
            for enc in self.encoder:
                x = enc(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.decoder, reversed(skips)):
                x = up(x)
                x = dec(torch.cat([crop(skip, x.shape[2:]), x], 1))
            return self.head(x)
    return TorchUNet()


def torch_step(cfg, device, tf32=False):
    """A closure running one PyTorch training step of the same network on `device` (with TF32
    tensor-core arithmetic in cuDNN and matmul only if `tf32`)."""
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if device == "cpu":
        import numba
        torch.set_num_threads(numba.get_num_threads())
    torch.manual_seed(0)
    model = _torch_unet(cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    x, y = _batch(cfg)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def images_per_second(step, batch, rounds):
    """Throughput of `step` over the median of `rounds` steps, after two warm-up steps."""
    return batch / isolated.median_seconds(step, rounds)


def _torch_usable(device):
    return torch is not None and (device == "cpu" or torch.cuda.is_available())


def measure_in_subprocess(library, cfg, device, rounds, import_first="numpy", extra=()):
    """images/s of `library` ('minunet' or 'pytorch'), timed in a fresh Python process that
    imports it first, after numpy if `import_first` is 'numpy' (benchmarks/isolated.py says why);
    `extra`: more options for that process (e.g. --cuda-graph)."""
    args = ["--device", device, "--rounds", rounds, f"--import-first={import_first}", *extra] + [
        f"--{k.replace('_', '-')}={cfg[k]}" for k in _CONFIG_KEYS]
    return isolated.measure(pathlib.Path(__file__).resolve(), library, args)["images_per_s"]


def compare_import_order(cfg, device, rounds, pairs):
    """minunet's images/s in processes that import numpy first and minunet first, alternating
    (ABBA); prints each pair and the median ratio numpy-first / minunet-first."""
    print(f"minunet U-Net train step, {device}: import order (each figure the median of {rounds} steps "
          f"in a fresh process)")
    ratios = []
    for i in range(pairs):  # ABBA: every other pair starts with the other order, so drift cancels
        orders = ("numpy", "library") if i % 2 == 0 else ("library", "numpy")
        ips = {order: measure_in_subprocess("minunet", cfg, device, rounds, order) for order in orders}
        numpy_first, minunet_first = ips["numpy"], ips["library"]
        ratios.append(numpy_first / minunet_first)
        print(f"pair {i + 1}: numpy first {numpy_first:8.2f} images/s   minunet first {minunet_first:8.2f} images/s"
              f"   ratio {ratios[-1]:.3f}", flush=True)
    print(f"ratio    {float(np.median(ratios)):.3f}  (median of {pairs} pairs, numpy first / minunet first)")


def profile_step(cfg, device, rounds, top=25):
    """Prints where minunet's step spends its time (see the module's docstring): a table of the
    contract's kernels by time per step, and cProfile's top functions."""
    step = minunet_step(cfg, device)
    for _ in range(2):
        step()
    kernels = backend.kernels_for(backend.to_device(np.zeros(1, np.float32), device))
    spent, calls = collections.Counter(), collections.Counter()

    def timed(name, launch):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return launch(*args, **kwargs)
            finally:
                _synchronize(device)
                first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]  # concat's: a list
                key = (name, tuple(first.shape))
                spent[key] += time.perf_counter() - start
                calls[key] += 1
        return run
    checked = {name: getattr(kernels, name) for name in contract.CONTRACT}
    for name, launch in checked.items():
        setattr(kernels, name, timed(name, launch))
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            step()
        total = (time.perf_counter() - start) / rounds
    finally:
        for name, launch in checked.items():
            setattr(kernels, name, launch)
    per_name = collections.Counter()
    for (name, _), t in spent.items():
        per_name[name] += t / rounds
    print(f"minunet step, {device}: {total * 1e3:.1f} ms (mean of {rounds}); kernels by time per step")
    for name, t in per_name.most_common():
        print(f"  {name:34s} {t * 1e3:8.2f} ms  {100 * t / total:5.1f}%")
    inside = sum(per_name.values())
    print(f"  {'outside the kernels':34s} {(total - inside) * 1e3:8.2f} ms  {100 * (total - inside) / total:5.1f}%")
    print(f"the {top} slowest (kernel, first argument's shape):")
    for (name, shape), t in spent.most_common(top):
        print(f"  {name:34s} {str(shape):22s} x{calls[name, shape] // rounds:<3d} {t / rounds * 1e3:8.2f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    print(f"cProfile, {rounds} steps, by own time:\n" + text[text.index("   ncalls"):].rstrip())


@pytest.mark.parametrize("device, cuda_graph", [("cpu", False), pytest.param("cuda", False, marks=pytest.mark.gpu),
                                                pytest.param("cuda", True, marks=pytest.mark.gpu, id="cuda-graph")])
def test_train_step(benchmark, device, cuda_graph):
    if device == "cuda" and not backend.cuda_available():
        pytest.skip(f"no usable GPU: {backend.cuda_status()[1]}")
    cfg = dict(CONFIG)
    rounds = 5 if device == "cpu" else 20
    check_step(cfg)
    step = minunet_step(cfg, device, cuda_graph)
    for _ in range(2):  # warm-up: numba / NVRTC compilation is not a training step (nor a graph's capture)
        step()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    ours = cfg["batch"] / benchmark.stats.stats.median
    benchmark.extra_info.update(device=device, config=cfg, cuda_graph=cuda_graph, minunet_images_per_s=ours)
    if _torch_usable(device):
        theirs = measure_in_subprocess("pytorch", cfg, device, rounds)
        benchmark.extra_info.update(torch_version=torch.__version__, torch_images_per_s=theirs,
                                    torch_ratio=ours / theirs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default="base16", choices=sorted(UNET_CONFIGS),
                   help="the network and batch (benchmarks/flops.py); the options below override its entries")
    for k in _CONFIG_KEYS:
        p.add_argument(f"--{k.replace('_', '-')}", type=str if k == "padding" else int, default=None,
                       choices=["same", "valid"] if k == "padding" else None)
    p.add_argument("--rounds", type=int, default=7, help="timed steps per measurement (the median counts)")
    p.add_argument("--pairs", type=int, default=3,
                   help="minunet/PyTorch measurements, alternating, each in its own process (the median ratio counts)")
    p.add_argument("--library", choices=["minunet", "pytorch"],
                   help="time only this library, in this process, and print one JSON line (used by the pairs)")
    p.add_argument("--torch-tf32", action="store_true",
                   help="let PyTorch use TF32 tensor cores (off by default: both sides then do true float32)")
    p.add_argument("--import-first", choices=["numpy", "library"], default="numpy",
                   help="with --library: what this process imported first (read before argparse runs)")
    p.add_argument("--compare-import-order", action="store_true",
                   help="time minunet alone, alternating processes that import numpy first and minunet first")
    p.add_argument("--profile", action="store_true",
                   help="time minunet alone, in this process, kernel by kernel, then under cProfile")
    p.add_argument("--precision", choices=backend.PRECISIONS, default="fp32",
                   help="minunet's convolutions: fp32, or tf32 (the GPU's TF32 tensor cores, as `minunet train "
                        "--precision tf32`; compare it with --torch-tf32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="minunet's step captured once as a CUDA graph and replayed (as `minunet train --cuda-graph`)")
    args = p.parse_args()
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph captures GPU work: it needs --device cuda")
    device = backend.normalize_device(args.device)
    cfg = dict(CONFIG, **UNET_CONFIGS[args.config])
    cfg.update({k: getattr(args, k) for k in _CONFIG_KEYS if getattr(args, k) is not None})
    if args.library:
        with backend.conv_precision(args.precision):
            step = (minunet_step(cfg, device, args.cuda_graph) if args.library == "minunet"
                    else torch_step(cfg, device, args.torch_tf32))
            print(json.dumps({"library": args.library, "device": device, "config": cfg,
                              "torch_tf32": args.torch_tf32 if args.library == "pytorch" else None,
                              "precision": args.precision if args.library == "minunet" else None,
                              "cuda_graph": args.cuda_graph if args.library == "minunet" else None,
                              "images_per_s": images_per_second(step, cfg["batch"], args.rounds)}))
        return
    if args.profile:
        profile_step(cfg, device, args.rounds)
        return
    check_step(cfg)
    if args.compare_import_order:
        compare_import_order(cfg, device, args.rounds, args.pairs)
        return
    print(f"U-Net train step, {device}: {cfg['in_channels']} -> {cfg['num_classes']} channels, base_channels="
          f"{cfg['base_channels']} depth={cfg['depth']} padding={cfg['padding']} {cfg['size']}x{cfg['size']} batch "
          f"{cfg['batch']}, SGD momentum {cfg['momentum']}; each figure the median of {args.rounds} steps in a fresh "
          f"process importing {'NumPy, then the library' if args.import_first == 'numpy' else 'the library first'}")
    ours_extra = ["--cuda-graph"] if args.cuda_graph else []
    if not _torch_usable(device):
        ours = measure_in_subprocess("minunet", cfg, device, args.rounds, args.import_first, ours_extra)
        print(f"minunet  {ours:9.2f} images/s\npytorch  not installed or no GPU for it: no ratio")
        return
    ratios = []
    for i in range(args.pairs):
        ours = measure_in_subprocess("minunet", cfg, device, args.rounds, args.import_first, ours_extra)
        theirs = measure_in_subprocess("pytorch", cfg, device, args.rounds, args.import_first)
        ratios.append(ours / theirs)
        print(f"pair {i + 1}: minunet {ours:8.2f} images/s   pytorch {theirs:8.2f} images/s   ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"ratio    {float(np.median(ratios)):.3f}  (median of {args.pairs} pairs, minunet / pytorch "
          f"{torch.__version__})")


if __name__ == "__main__":
    main()
