"""The `minunet` command end to end on tiny configurations: train (run files, exact resume
after Ctrl-C), predict (overlap-tile bookkeeping, full-size outputs), eval, and one clear
line with exit status 2 for every kind of bad input."""
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from minunet import nn, train as train_module
from minunet.autograd import tensor
from minunet.checkpoint import read_checkpoint, save_checkpoint
from minunet.cli import main
from minunet.data import SyntheticDataset
from minunet.figures import plot_curves
from minunet.predict import Tiler
from minunet.unet import UNet

TINY = ["--samples", "20", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "2",
        "--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "--no-progress"]


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["train", *TINY, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny finished training run, shared by the predict and eval tests."""
    return _train(tmp_path_factory.mktemp("run"), "run")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled folder, images/ + masks/, of synthetic 50x70 images (not a multiple of any tile)."""
    root = tmp_path_factory.mktemp("folder")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    ds = SyntheticDataset(num_samples=3, image_size=(50, 70), num_classes=3, seed=5)
    for i in range(len(ds)):
        x, y = ds[i]
        pixels = np.clip((x[0] - x.min()) / (x.max() - x.min()) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        Image.fromarray(y.astype(np.uint8)).save(root / "masks" / f"img{i}.png")
    return root


def _one_error_line(capsys, rc, *fragments):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


# ---- train --------------------------------------------------------------------------------

def test_train_writes_every_run_file(run, capsys):
    names = {p.name for p in run.iterdir()}
    assert {"best.safetensors", "last.safetensors", "metrics.jsonl", "curves.png", "predictions.png"} <= names
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("train_loss", "val_loss", "dice", "iou", "mean_iou", "mean_dice", "pixel_accuracy", "lr", "seconds"):
        assert key in lines[-1]
    assert len(lines[-1]["dice"]) == 3 and 0 <= lines[-1]["pixel_accuracy"] <= 1
    last = read_checkpoint(run / "last.safetensors")
    assert last.epoch == 2 and last.model_config["base_channels"] == 4
    assert Image.open(run / "predictions.png").size[0] > 0


def test_train_prints_the_final_mean_dice(tmp_path, capsys):
    _train(tmp_path, "r", "--epochs", "1", "--samples", "8")
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert "validation mean Dice" in out.splitlines()[-1]


def test_train_a_valid_padding_model(tmp_path):
    """The paper's unpadded U-Net: targets are cropped to the output in training, and the
    validation images are scored whole (mirrored overlap-tiles), drawn at full size."""
    out = _train(tmp_path, "valid", "--padding", "valid", "--image-size", "60", "--epochs", "1", "--samples", "12")
    assert read_checkpoint(out / "last.safetensors").model_config["padding"] == "valid"
    assert json.loads((out / "metrics.jsonl").read_text())["epoch"] == 1
    assert (out / "predictions.png").exists()


@pytest.mark.slow
def test_a_short_default_run_learns_the_synthetic_task(tmp_path, capsys):
    """The default recipe (BatchNorm U-Net, Adam, cosine schedule), cut down to two classes
    and 32x32 images so that it runs in well under a minute, must really segment."""
    args = ["--classes", "2", "--image-size", "32", "--samples", "100", "--epochs", "4", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "short")]
    assert main(["train", *args]) == 0
    final = json.loads((tmp_path / "short" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["mean_dice"] >= 0.8, final
    assert f"validation mean Dice {final['mean_dice']:.4f}" in capsys.readouterr().out


def _interrupt_when(monkeypatch, module_attr, call):
    """Send ourselves SIGINT (a Ctrl-C) during the `call`-th call of train.<module_attr>."""
    original, calls = getattr(train_module, module_attr), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(train_module, module_attr, wrapper)


@pytest.mark.parametrize("where, call", [("segmentation_loss", 2),   # mid-epoch: after the 2nd batch
                                         ("write_metrics", 1)])      # at the end of epoch 1
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(run, tmp_path, monkeypatch, capsys, where, call):
    straight = run  # the same TINY configuration, never interrupted
    with monkeypatch.context() as m:
        _interrupt_when(m, where, call)
        assert main(["train", *TINY, "--out", str(tmp_path / "resumed")]) == 130
    assert "continue with: minunet train --resume" in capsys.readouterr().out
    stopped = read_checkpoint(tmp_path / "resumed" / "last.safetensors")
    assert stopped.epoch < 2
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--no-progress"]) == 0

    a = read_checkpoint(straight / "last.safetensors")
    b = read_checkpoint(tmp_path / "resumed" / "last.safetensors")
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)
    for i in a.optimizer_state["state"]:
        np.testing.assert_array_equal(a.optimizer_state["state"][i]["exp_avg_sq"],
                                      b.optimizer_state["state"][i]["exp_avg_sq"])
    ma = [json.loads(s) for s in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s) for s in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("epoch", "train_loss", "val_loss", "dice", "mean_dice", "lr"):
            assert ra[key] == rb[key], key


# ---- predict ------------------------------------------------------------------------------

class _CropModel:
    """A stand-in network that copies its input to its output, trimming a border of b pixels
    on each side as a 'valid' U-Net does (b = 0: a 'same' one). Tiling it must rebuild the
    image exactly, which checks every index of the overlap-tile bookkeeping."""

    def __init__(self, channels, border):
        self.config = {"num_classes": channels, "padding": "valid" if border else "same"}
        self.border, self.training, self.seen = border, False, set()
        self._p = tensor(np.zeros(1, np.float32))

    def parameters(self):
        return iter([self._p])

    def check_input_size(self, h, w):
        return h - 2 * self.border, w - 2 * self.border

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        self.seen.add(x.shape + (x.data.flags.c_contiguous,))
        b = self.border
        return x[:, :, b:x.shape[2] - b, b:x.shape[3] - b] if b else x


@pytest.mark.parametrize("border, tile, margin", [(0, 16, 3), (0, 32, 0), (6, 20, 0), (6, 24, 2)])
def test_tiling_covers_every_pixel_exactly_once(border, tile, margin):
    image = np.random.default_rng(0).standard_normal((2, 3, 37, 50)).astype(np.float32)
    model = _CropModel(3, border)
    tiler = Tiler(model, tile, margin=margin, batch_size=3)
    np.testing.assert_array_equal(tiler.run(image, logits=True), image)
    np.testing.assert_array_equal(tiler.run(image), image.argmax(axis=1))
    # the network only ever sees batches of at most 3 tiles, never the whole image
    assert {s[1:] for s in model.seen} == {(3, tile, tile, True)} and max(s[0] for s in model.seen) == 3


def test_predict_folder_with_tiles_of_a_non_multiple_size(run, folder, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["predict", "--model", str(run / "best.safetensors"), "--input", str(folder / "images"),
               "--output", str(out), "--tile", "16", "--overlay", "--device", "cpu"])
    assert rc == 0
    assert "3 image(s) predicted" in capsys.readouterr().out
    for i in range(3):
        mask = np.asarray(Image.open(out / f"img{i}_mask.png"))
        assert mask.shape == (50, 70) and mask.max() < 3
        assert Image.open(out / f"img{i}_color.png").size == (70, 50)
        assert Image.open(out / f"img{i}_overlay.png").mode == "RGB"


def test_predict_with_a_valid_padding_model_gives_full_size_masks(folder, tmp_path, capsys):
    nn.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2, padding="valid")
    save_checkpoint(tmp_path / "valid.safetensors", model)
    assert model.output_size(60) == 20  # each tile gives 20x20 of the 50x70 image
    rc = main(["predict", "--model", str(tmp_path / "valid.safetensors"), "--output", str(tmp_path / "pred"),
               "--input", str(folder / "images" / "img1.png"), "--tile", "60", "--device", "cpu"])
    assert rc == 0
    assert np.asarray(Image.open(tmp_path / "pred" / "img1_mask.png")).shape == (50, 70)


# ---- eval ---------------------------------------------------------------------------------

def test_eval_prints_a_table_and_writes_json(run, folder, tmp_path, capsys):
    rc = main(["eval", "--model", str(run / "best.safetensors"), "--data", str(folder), "--classes", "3",
               "--json", str(tmp_path / "scores.json"), "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 images from" in out and "mean" in out and "pixel accuracy" in out and "background" not in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["images"] == 3 and len(scores["dice"]) == 3 and 0 <= scores["pixel_accuracy"] <= 1


def test_eval_names_the_classes_it_is_told(run, folder, capsys):
    assert main(["eval", "--model", str(run / "best.safetensors"), "--data", str(folder), "--classes", "3",
                 "--class-names", "sky, road ,car", "--json", "-", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert all(name in captured.err for name in ("sky", "road", "car"))  # the table, beside the JSON
    assert json.loads(captured.out)["class_names"] == ["sky", "road", "car"]


def test_eval_adds_the_challenge_scores_for_2_class_data(tmp_path, capsys):
    out = _train(tmp_path, "binary", "--classes", "2")
    model = str(out / "best.safetensors")
    capsys.readouterr()

    def scores(*extra):  # with --json -, stdout holds the JSON alone and the table goes to stderr
        assert main(["eval", "--model", model, *extra, "--json", "-", "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out), captured.err

    plain, table = scores()
    assert "pixel error" in table and "Rand error" in table
    assert plain["pixel_error"] == pytest.approx(1 - plain["pixel_accuracy"]) and 0 <= plain["rand_error"] <= 1
    assert plain["tta"] is False and plain["threshold"] is None
    basic, table = scores("--metrics", "basic")
    assert "Rand error" not in table and "rand_error" not in basic
    # threshold 0.5 is the argmax; a low threshold calls more pixels class 1, so the scores move
    assert scores("--threshold", "0.5")[0]["pixel_error"] == pytest.approx(plain["pixel_error"], abs=1e-4)
    assert scores("--threshold", "0.01")[0]["pixel_error"] != plain["pixel_error"]
    tta = scores("--tta")[0]
    assert tta["tta"] is True and 0 <= tta["pixel_error"] <= 1 and tta["loss"] != plain["loss"]


def test_challenge_scores_and_threshold_need_2_classes(run, capsys):
    for extra in (["--metrics", "challenge"], ["--threshold", "0.6"]):
        rc = main(["eval", "--model", str(run / "best.safetensors"), *extra, "--device", "cpu"])
        _one_error_line(capsys, rc, extra[0], "2-class", "3 classes")


def test_predict_with_tta(run, folder, tmp_path, capsys):
    rc = main(["predict", "--model", str(run / "best.safetensors"), "--input", str(folder / "images" / "img2.png"),
               "--output", str(tmp_path / "pred"), "--tile", "32", "--tta", "--device", "cpu"])
    assert rc == 0
    assert np.asarray(Image.open(tmp_path / "pred" / "img2_mask.png")).shape == (50, 70)


@pytest.mark.parametrize("names, expected", [(("membrane", "cell"), ["Dice membrane", "Dice cell"]),
                                             (None, ["Dice class 0", "Dice class 1"])])
def test_curves_show_each_class(tmp_path, monkeypatch, names, expected):
    import matplotlib.figure
    legends = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kwargs):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    history = [dict(epoch=e, train_loss=1 / e, val_loss=1.2 / e, mean_dice=0.5, mean_iou=0.4, pixel_accuracy=0.8,
                    dice=[0.4, 0.6]) for e in (1, 2)]
    plot_curves(tmp_path / "curves.png", history, names)
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    assert [t for t in legends if t.startswith("Dice")] == expected


def test_folder_run_keeps_its_class_names_and_eval_may_rename(folder, tmp_path, capsys):
    out = _train(tmp_path, "named", "--data", str(folder), "--classes", "3", "--class-names", "a,b,c",
                 "--epochs", "1", "--image-size", "32")
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "best.safetensors"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["a", "b", "c"]  # the names the run was trained with
    assert main(["eval", "--model", str(out / "best.safetensors"), "--class-names", "x,y,z", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["x", "y", "z"]  # renamed: same validation split


def test_a_scaled_run_is_evaluated_at_its_scale(folder, tmp_path, capsys):
    out = _train(tmp_path, "half", "--data", str(folder), "--classes", "3", "--scale", "0.5",
                 "--epochs", "1", "--image-size", "16")
    assert read_checkpoint(out / "best.safetensors").train_config["scale"] == 0.5
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "best.safetensors"), "--data", str(folder), "--classes", "3",
                 "--json", "-", "--device", "cpu"]) == 0  # the run's --scale 0.5 carries over
    scores = json.loads((lambda o: o[o.index("{"):])(capsys.readouterr().out))
    assert scores["images"] == 3 and 0 <= scores["pixel_accuracy"] <= 1
    assert main(["predict", "--model", str(out / "best.safetensors"), "--input", str(folder / "images"),
                 "--output", str(tmp_path / "pred"), "--overlay", "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "pred" / "img0_mask.png").size == (70, 50)  # back at the image's size
    assert Image.open(tmp_path / "pred" / "img0_overlay.png").size == (70, 50)
    capsys.readouterr()  # predict's progress bar
    rc = main(["train", "--scale", "0.5", "--out", str(tmp_path / "r"), "--device", "cpu"])
    _one_error_line(capsys, rc, "--scale", "folder data")


def test_class_names_must_match_the_classes(run, folder, capsys):
    rc = main(["eval", "--model", str(run / "best.safetensors"), "--data", str(folder), "--classes", "3",
               "--class-names", "sky,road", "--device", "cpu"])
    assert rc == 2 and "--class-names gives 2 names, but the model" in capsys.readouterr().err


def test_eval_defaults_to_the_validation_split(run, capsys):
    assert main(["eval", "--model", str(run / "last.safetensors"), "--json", "-", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "5 images: the validation split of the synthetic set" in captured.err and "rectangle" in captured.err
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    scores = json.loads(captured.out)
    assert scores["mean_dice"] == pytest.approx(final["mean_dice"], abs=2e-3)


# ---- bad input: one line on stderr, exit status 2 ------------------------------------------

def test_class_names_are_for_folder_data(tmp_path, capsys):
    rc = main(["train", "--class-names", "a,b,c", "--out", str(tmp_path / "r"), "--device", "cpu"])
    _one_error_line(capsys, rc, "--class-names", "synthetic")


def test_missing_data_folder(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--device", "cpu"])
    _one_error_line(capsys, rc, "nowhere", "not a folder")


@pytest.mark.parametrize("args, fragment", [(["--lr", "-1"], "--lr"), (["--val-fraction", "2"], "--val-fraction"),
                                           (["--optimizer", "lbfgs"], "invalid choice"),
                                           (["--image-size", "30"], "nearest valid input sizes: 24, 32")])
def test_bad_option_values(args, fragment, capsys):
    _one_error_line(capsys, main(["train", "--device", "cpu", *args]), fragment)


def test_corrupt_image(folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    for sub in ("images", "masks"):
        (bad / sub).mkdir(parents=True)
        for p in (folder / sub).iterdir():
            (bad / sub / p.name).write_bytes(p.read_bytes())
    (bad / "images" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rc = main(["train", "--data", str(bad), "--classes", "3", "--image-size", "32", "--device", "cpu"])
    _one_error_line(capsys, rc, "img1.png")


def test_images_and_masks_that_do_not_pair(folder, tmp_path, capsys):
    rc = main(["train", "--images", str(folder / "images"), "--masks", str(tmp_path), "--classes", "3"])
    _one_error_line(capsys, rc)
    (tmp_path / "other.png").write_bytes((folder / "masks" / "img0.png").read_bytes())
    rc = main(["train", "--images", str(folder / "images"), "--masks", str(tmp_path), "--classes", "3"])
    _one_error_line(capsys, rc, "do not pair", "img1.png")


def test_truncated_and_missing_checkpoints(run, folder, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    data = (run / "best.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    rc = main(["predict", "--model", str(cut), "--input", str(folder / "images"), "--output", str(tmp_path)])
    _one_error_line(capsys, rc, "cut.safetensors is truncated or not a safetensors file")
    rc = main(["eval", "--model", str(tmp_path / "none.safetensors")])
    _one_error_line(capsys, rc, "does not exist")


def test_checkpoints_of_another_architecture(run, folder, tmp_path, capsys):
    rc = main(["train", "--resume", str(run), "--base-channels", "8"])
    _one_error_line(capsys, rc, "--base-channels 8 differs from the resumed run's 4")
    model = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
    model._config["base_channels"] = 8  # a file whose tensors do not match its own config
    save_checkpoint(tmp_path / "odd.safetensors", model)
    rc = main(["predict", "--model", str(tmp_path / "odd.safetensors"), "--input", str(folder / "images"),
               "--output", str(tmp_path)])
    _one_error_line(capsys, rc, "does not fit this model", "shape mismatch")
    rc = main(["eval", "--model", str(run / "best.safetensors"), "--data", str(folder), "--mask-mode", "binary"])
    _one_error_line(capsys, rc, "the masks define 2 classes (--mask-mode binary), but the model")


def test_train_precision_tf32_is_recorded_and_says_it_does_nothing_on_the_cpu(tmp_path, capsys):
    out = _train(tmp_path, "tf32", "--precision", "tf32", "--epochs", "1")
    assert "precision: tf32 has no effect on the CPU" in capsys.readouterr().out
    assert read_checkpoint(out / "last.safetensors").train_config["precision"] == "tf32"
