"""minunet.cli: the `minunet` command (also `python -m minunet`).

    minunet train                      train on the built-in synthetic set (no download)
    minunet train --data DIR ...       train on DIR/images + DIR/masks
    minunet train --resume RUN_DIR     continue an interrupted run exactly where it stopped
    mpiexec -n 4 minunet train ...     the same, data-parallel over 4 processes (GPUs)
    minunet predict --model CKPT --input FILE_OR_DIR --output DIR [--tile N] [--overlay] [--tta]
    minunet eval --model CKPT [--data DIR ...] [--json FILE] [--tta] [--metrics challenge]

Every subcommand turns bad input (a missing path, an impossible option value, a damaged
image, masks that do not pair with images, a truncated checkpoint, a checkpoint of another
architecture) into one line on stderr and exit status 2, never a traceback. The error
checks live where the knowledge is (options, data, checkpoint, unet, train); this module
only parses the command line and reports.

Exit status: 0 done; 1 training diverged (a NaN or infinite loss or gradient: the message
names the step and the likely cause); 2 bad input; 130 stopped by Ctrl-C; 143 stopped by
SIGTERM (both save last.safetensors first, and --resume goes on from there).

Under mpiexec every process runs this command and only rank 0 prints. A process that fails
alone reports its error (one line, naming its rank) and then ends the whole job with
MPI_Abort: the others may be waiting for it in a collective and would wait forever.
"""
import argparse
import dataclasses
import json
import pathlib
import signal
import sys
import threading

import numpy as np
from tqdm import tqdm

from minunet import backend, cpu, distributed
from minunet.checkpoint import read_checkpoint
from minunet.data import split_indices
from minunet.metrics import format_table
from minunet.options import check_folder, check_writable_file
from minunet.predict import check_tile, load_model, predict_files
from minunet.train import (RESUMABLE_CHANGES, Diverged, TrainConfig, build_dataset, evaluate, json_safe,
                           resolve_resume, train)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage; one line is clearer
        raise UsageError(f"{self.prog}: {message}")


# ---- option value types -----------------------------------------------------------------------

def _number(kind, ok, expected):
    """An option type: `kind`(text) where ok(value) holds, else an error naming `expected`."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
_fraction = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def _number_list(kind):
    def parse(text):
        try:
            values = [kind(t) for t in text.replace(",", " ").split()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")
        return values
    parse.__name__ = f"{kind.__name__} list"
    return parse


def _name_list(text):
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _add_data_options(p, defaults_from):
    g = p.add_argument_group("data (" + defaults_from + ")")
    g.add_argument("--data", metavar="DIR", help="folder with images/ and masks/ subfolders")
    g.add_argument("--images", metavar="DIR", help="image folder (instead of DIR/images)")
    g.add_argument("--masks", metavar="DIR", help="mask folder (instead of DIR/masks)")
    g.add_argument("--pairing", choices=["stem", "sorted"], help="pair by file stem (default) or by sorted order")
    g.add_argument("--mask-prefix", metavar="P", help="mask name = P + image stem + suffix (stem pairing)")
    g.add_argument("--mask-suffix", metavar="S", help="mask name = prefix + image stem + S (stem pairing)")
    g.add_argument("--mask-mode", choices=["index", "binary", "gray", "palette"],
                   help="how mask pixels encode classes (default index)")
    g.add_argument("--gray-levels", type=_number_list(int), metavar="V0,V1,...",
                   help="mask value of each class (--mask-mode gray)")
    g.add_argument("--palette", metavar="FILE",
                   help="class colours (--mask-mode palette): JSON {\"name\": [r, g, b], ...}, [[r, g, b], ...], "
                        "[{\"name\": [r, g, b]}, ...] or [{\"name\": ..., \"color\": [r, g, b]}, ...], or text "
                        "lines 'r g b [name]'. A void colour (pixels not to score) is left out of the palette "
                        "and needs --ignore-index: a colour not in the palette is an error without it")
    g.add_argument("--ignore-index", type=int, metavar="L",
                   help="mask label that is not scored (e.g. 255); with --mask-mode binary, gray or palette, every "
                        "pixel whose value or colour is not a class gets this label (a void colour)")
    g.add_argument("--channels", type=int, choices=[1, 3], help="convert images to 1 or 3 channels")
    g.add_argument("--classes", type=_positive_int, metavar="K",
                   help="number of classes (index masks; synthetic 2-5, default 3)")
    g.add_argument("--class-names", type=_name_list, metavar="NAME0,NAME1,...",
                   help="names for the classes in tables and pictures (a palette file may name them too)")
    g.add_argument("--scale", type=_positive_float, metavar="S",
                   help="resize images (area average) and masks (nearest pixel) by S on loading, e.g. 0.5")


def _on(flag):
    return "on" if flag else "off"


TILE_HELP = "input tile size (default: at least the training crop and 256, at most the image)"
TTA_HELP = "test-time augmentation: average the softmax over the 8 flips and quarter turns (8x the time)"


def build_parser():
    parser = _Parser(prog="minunet", description="U-Net segmentation from scratch: train, predict, evaluate")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,eval}")
    sub.required = True

    # Every train option defaults to None, so that "given on the command line" is visible:
    # the rest comes from TrainConfig's defaults, or from the checkpoint when resuming.
    t = sub.add_parser("train", help="train a U-Net (synthetic data by default)",
                       description="Train a U-Net. With no options: the synthetic task, in a few minutes on a CPU.")
    _add_data_options(t, "default: the synthetic set")
    d = TrainConfig()  # the defaults shown in --help are TrainConfig's
    g = t.add_argument_group("training")
    g.add_argument("--samples", type=_positive_int, help=f"synthetic images (default {d.samples})")
    g.add_argument("--image-size", type=_positive_int, metavar="N",
                   help=f"synthetic image size / training crop (default {d.image_size})")
    g.add_argument("--val-fraction", type=_fraction,
                   help=f"share of images held out for validation (default {d.val_fraction})")
    g.add_argument("--val-split", choices=["random", "contiguous"],
                   help=f"random items or the last block (default {d.val_split})")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help=f"flips and 90-degree turns (default {_on(d.augment)})")
    g.add_argument("--elastic", action=argparse.BooleanOptionalAction,
                   help=f"elastic deformation (default {_on(d.elastic)})")
    g.add_argument("--base-channels", type=_positive_int,
                   help=f"channels of the first level (default {d.base_channels})")
    g.add_argument("--depth", type=_positive_int, help=f"number of poolings (default {d.depth})")
    g.add_argument("--padding", choices=["same", "valid"],
                   help=f"'same' keeps sizes, 'valid' is the paper's (default {d.padding})")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                   help=f"BatchNorm after each convolution (default {_on(d.batch_norm)})")
    g.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction,
                   help="under mpiexec: BatchNorm statistics of the global batch, not of each process's share "
                        f"(default {_on(d.sync_batch_norm)})")
    g.add_argument("--epochs", type=_positive_int, help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=_positive_int,
                   help=f"default {d.batch_size}; under mpiexec the global batch, shared by the processes")
    g.add_argument("--lr", type=_positive_float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help=f"default {d.optimizer}")
    g.add_argument("--momentum", type=_non_negative_float, help=f"SGD momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=_non_negative_float, help=f"default {d.weight_decay}")
    g.add_argument("--schedule", choices=["cosine", "constant"],
                   help=f"learning-rate schedule, stepped every batch (default {d.schedule})")
    g.add_argument("--class-weights", type=_number_list(float), metavar="W0,W1,...", help="cross-entropy class weights")
    g.add_argument("--dice-weight", type=_non_negative_float,
                   help=f"add this times the soft Dice loss (default {d.dice_weight})")
    g.add_argument("--border-weights", action=argparse.BooleanOptionalAction,
                   help=f"the U-Net paper's border weight map on the cross-entropy (w0 {d.border_w0}, "
                        f"sigma {d.border_sigma}; default {_on(d.border_weights)})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: the GPU when usable")
    g.add_argument("--precision", choices=["fp32", "tf32"],
                   help=f"tf32: the GPU's convolutions on its TF32 tensor cores (about 1e-3 relative error; "
                        f"no effect on the CPU); default {d.precision}")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="capture the training step once as a CUDA graph and replay it every batch (GPU, one "
                        f"process, every batch of one shape); default {_on(d.cuda_graph)}")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g.add_argument("--out", metavar="DIR",
                   help="run folder (default runs/<timestamp>); made at the first checkpoint, and never one "
                        "that holds another run unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="let --out replace the run it holds (its checkpoints, metrics and pictures)")
    g.add_argument("--resume", metavar="CKPT_OR_DIR",
                   help="continue from a checkpoint or a run folder's last.safetensors; with a larger "
                        "--epochs, extend it (the cosine schedule is planned over the new total)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default on)")

    p = sub.add_parser("predict", help="segment an image file or a folder of images",
                       description="Write <name>_mask.png (class indices), <name>_color.png and, with --overlay, "
                                   "<name>_overlay.png for each image. Large images are predicted tile by tile.")
    p.add_argument("--model", required=True, metavar="CKPT", help="a checkpoint (best.safetensors, ...)")
    p.add_argument("--input", required=True, metavar="FILE_OR_DIR")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--tile", type=_positive_int, metavar="N", help=TILE_HELP)
    p.add_argument("--overlay", action="store_true", help="also write the mask blended over the image")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the tiles of all the images, on stderr (default on)")

    e = sub.add_parser("eval", help="score a checkpoint: per-class Dice and IoU, mIoU, pixel accuracy",
                       description="Score a checkpoint on a labelled folder, or by default on the validation "
                                   "split of the data it was trained on. On a folder, the data options not given "
                                   "(mask format, prefix, class names, ...) are the checkpoint's, and eval "
                                   "names each one it takes.")
    e.add_argument("--model", required=True, metavar="CKPT")
    _add_data_options(e, "default: the checkpoint's validation split")
    e.add_argument("--tile", type=_positive_int, metavar="N", help=TILE_HELP)
    e.add_argument("--batch-size", type=_positive_int, default=4, help="tiles per forward pass (default 4)")
    e.add_argument("--json", metavar="FILE",
                   help="also write the scores as JSON to FILE; '-' prints them, and only them, on stdout "
                        "(the table then goes to stderr)")
    e.add_argument("--tta", action="store_true", help=TTA_HELP)
    e.add_argument("--metrics", choices=["auto", "basic", "challenge"], default="auto",
                   help="'challenge' adds the ISBI 2012 pixel error and Rand error (2-class data: class 1 the "
                        "objects, class 0 their boundaries); 'auto' (default) adds them for 2-class data")
    e.add_argument("--threshold", type=_fraction, metavar="T",
                   help="2-class data: predict class 1 where its probability is at least T (default: the argmax)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


# ---- the subcommands --------------------------------------------------------------------------

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _given(args, fields):
    """The options given on the command line, as TrainConfig field -> value."""
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def _device(name):
    try:
        return backend.normalize_device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {name}: {e}") from None


def cmd_train(args):
    given = _given(args, TRAIN_FIELDS)
    if "device" in given:
        _device(given["device"])
    resume = None
    if args.resume:
        resume = resolve_resume(args.resume)
        saved = read_checkpoint(resume).train_config
        if not saved:
            raise UsageError(f"--resume {resume}: the checkpoint holds no training configuration")
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TRAIN_FIELDS})
        changeable = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES if k in vars(args))
        for key, value in given.items():
            old = getattr(cfg, key)
            if key not in RESUMABLE_CHANGES and json.dumps(value) != json.dumps(old):
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} {value} differs from the resumed run's {old}; a resumed run keeps its "
                                 f"settings (only {changeable} may change)")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if k in RESUMABLE_CHANGES})
        if "out" not in given:
            cfg = dataclasses.replace(cfg, out=str(resume.parent))
    else:
        cfg = TrainConfig(**given)
    try:
        with np.errstate(all="ignore"):  # the loop itself reports a NaN or an infinity, once and clearly
            result = train(cfg, resume=resume, overwrite=args.overwrite)
    except Diverged as e:  # every rank sees the same loss and gradients, so all of them stop here
        if distributed.init().rank == 0:
            print(f"minunet train: {e}", file=sys.stderr)
        return 1
    status = 0
    if result["interrupted"]:
        status = 128 + (signal.SIGTERM if result["interrupted"] == "SIGTERM" else signal.SIGINT)
    if distributed.init().rank != 0:  # under mpiexec rank 0 speaks for all
        return status
    final = result["final"]
    if result["interrupted"]:
        print(f"interrupted by {result['interrupted']} with {result['epochs']} epoch(s) complete; "
              f"run folder {result['run_dir']}")
        return status
    best = result["best_mean_dice"]
    print(f"done: {result['epochs']} epochs in {result['seconds']:.1f} s; validation mean Dice "
          f"{final['mean_dice']:.4f} (best {best:.4f} at epoch {result['best_epoch']}), mIoU {final['mean_iou']:.4f}, "
          f"pixel accuracy {final['pixel_accuracy']:.4f}; run folder {result['run_dir']}")
    return 0


def cmd_predict(args):
    device = _device(args.device)
    check_folder(args.output, "--output")

    def report(path, labels):
        present = [int(k) for k in np.unique(labels)]
        tqdm.write(f"{path} -> {pathlib.Path(args.output) / (path.stem + '_mask.png')} "
                   f"({labels.shape[0]}x{labels.shape[1]}, classes {present})", file=sys.stdout)
    stems = predict_files(args.model, args.input, args.output, tile=args.tile, overlay_images=args.overlay,
                          device=device, batch_size=args.batch_size, progress=report, tta=args.tta,
                          bar=args.progress)
    print(f"{len(stems)} image(s) predicted into {args.output}")
    return 0


SOURCE_FIELDS = ("data", "images", "masks")
FORMAT_FIELDS = ("pairing", "mask_prefix", "mask_suffix", "mask_mode", "gray_levels", "palette", "ignore_index",
                 "channels", "classes", "class_names", "scale")
MODE_FIELDS = {"gray": "gray_levels", "palette": "palette"}  # options that only one --mask-mode reads


def _shown(value):
    """An option value as it is typed on the command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "''" if value == "" else str(value)


def _eval_config(args, model, ckpt, say):
    """The TrainConfig to score `model` with (own_data: whether a labelled folder was given).
    On a labelled folder, the format options not given take the checkpoint's values, and `say`
    names each one taken; --classes, --channels and --class-names must fit the model."""
    classes, channels = model.config["num_classes"], model.config["in_channels"]
    given = _given(args, set(SOURCE_FIELDS + FORMAT_FIELDS))
    if given.get("classes", classes) != classes:
        raise UsageError(f"eval: --classes {given['classes']}, but the model {args.model} has {classes} classes")
    if given.get("channels", channels) != channels:
        raise UsageError(f"eval: --channels {given['channels']}, but the model {args.model} takes {channels}")
    if len(given.get("class_names", [None] * classes)) != classes:
        raise UsageError(f"eval: --class-names gives {len(given['class_names'])} names, but the model "
                         f"{args.model} has {classes} classes")
    saved = {k: v for k, v in (ckpt.train_config or {}).items() if k in TRAIN_FIELDS}
    cfg = TrainConfig(**saved)
    own_data = bool(set(SOURCE_FIELDS) & set(given))
    if not own_data:
        if "class_names" in given and not cfg.is_synthetic():  # names change no data: fine for the saved split
            cfg = dataclasses.replace(cfg, class_names=given.pop("class_names"))
        if given:
            raise UsageError(f"eval: {', '.join('--' + k.replace('_', '-') for k in given)} need --data "
                             f"(or --images and --masks)")
        if not saved:
            raise UsageError(f"eval: checkpoint {ckpt.path} records no training data; give --data")
        return cfg, False
    # a labelled folder: all of it is scored; what is not given comes from the checkpoint
    default = TrainConfig()
    mode = given.get("mask_mode", cfg.mask_mode)
    taken = {k: getattr(cfg, k) for k in FORMAT_FIELDS
             if k not in given and getattr(cfg, k) != getattr(default, k) and k not in ("classes", "channels")
             and not (k in MODE_FIELDS.values() and MODE_FIELDS.get(mode) != k)}
    if mode == "index" and "classes" not in given:
        taken["classes"] = classes  # the model's
    if taken:
        say("eval: from the checkpoint: " + ", ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in taken.items())
            + " (an option given here replaces its value)")
    fresh = {k: None for k in SOURCE_FIELDS + tuple(MODE_FIELDS.values())}
    cfg = dataclasses.replace(default, **{**saved, **fresh, "classes": None, **taken, **given, "channels": channels})
    return cfg, True


def cmd_eval(args):
    # with --json -, stdout holds the JSON alone and everything meant for people goes to stderr
    say = (lambda text: print(text, file=sys.stderr)) if args.json == "-" else print
    if args.json not in (None, "-"):
        check_writable_file(args.json, "--json")
    device = _device(args.device)
    model, ckpt = load_model(args.model, device)
    check_tile(model, args.tile)
    cfg, own_data = _eval_config(args, model, ckpt, say)
    cfg = dataclasses.replace(cfg, batch_size=args.batch_size, border_weights=False)
    dataset = build_dataset(cfg)
    if dataset.num_classes != model.config["num_classes"]:
        raise UsageError(f"eval: the masks define {dataset.num_classes} classes (--mask-mode {cfg.mask_mode}), "
                         f"but the model {args.model} has {model.config['num_classes']}")
    if own_data:
        indices = list(range(len(dataset)))
    else:
        indices = split_indices(len(dataset), cfg.val_fraction, cfg.val_split, seed=cfg.seed)[1]
    binary = dataset.num_classes == 2
    if not binary and (args.metrics == "challenge" or args.threshold is not None):
        flag = "--metrics challenge" if args.metrics == "challenge" else "--threshold"
        raise UsageError(f"eval: {flag} is for 2-class data; this data has {dataset.num_classes} classes")
    challenge = args.metrics == "challenge" or (args.metrics == "auto" and binary)
    summary, _ = evaluate(model, dataset, indices, cfg, args.tile, tta=args.tta, challenge=challenge,
                          threshold=args.threshold)
    names = list(dataset.class_names) if dataset.class_names else None
    source = cfg.data or cfg.images or "the synthetic set"
    say(f"{len(indices)} images from {source}" if own_data else
        f"{len(indices)} images: the validation split of {source}")
    say(format_table(summary, names))
    if args.json:
        doc = dict(model=str(args.model), images=len(indices), class_names=names, tta=args.tta,
                   threshold=args.threshold, **summary)
        text = json.dumps({k: json_safe(v) for k, v in doc.items()}, indent=2)
        if args.json == "-":
            print(text)
        else:
            pathlib.Path(args.json).write_text(text + "\n")
            say(f"scores written to {args.json}")
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "eval": cmd_eval}


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which saves first, see minunet.train.StopRequest)."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv=None):
    """Entry point of the `minunet` console script; returns the exit status."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        args = build_parser().parse_args(argv)
        cpu.configure()  # the CPU kernels' thread pool, set up once, here (minunet/cpu/runtime.py)
        return COMMANDS[args.command](args)
    except _Terminated:  # as Ctrl-C: a message and the conventional status, not a silent death
        return _fail("minunet: terminated (SIGTERM)", 128 + signal.SIGTERM)
    except (UsageError, ValueError, OSError, distributed.DistributedError) as e:  # bad input, paths, setup
        message = str(e) if isinstance(e, UsageError) else f"minunet: error: {e}"
        return _fail(message.splitlines()[0] if message else "minunet: error", 2)
    except KeyboardInterrupt:
        return _fail("minunet: interrupted", 130)
    except Exception as e:  # a bug or an exhausted resource: alone, Python's traceback; in a job, end the job
        if distributed.active() is None:
            raise
        return _fail(f"minunet: error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", 1)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _fail(message, status):
    """Report an error on stderr; one of several processes then ends the whole job (MPI_Abort)."""
    group = distributed.active()
    if group is None:
        print(message, file=sys.stderr)
        return status
    print(f"{message} [rank {group.rank} of {group.size}]", file=sys.stderr, flush=True)
    group.abort(status)
