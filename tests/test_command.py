"""The `minunet` command as a user meets it, run as a program in a subprocess: nothing lost
(runs are never overwritten unasked, a diverging run stops and keeps its good checkpoints,
SIGTERM saves, a failed start leaves no folder), nothing silent, and errors that name the
flag the user typed.

The command is the `minunet` console script installed next to this Python (CI installs the
project with pip, so it is there), else `python -m minunet` from this checkout."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minunet import nn
from minunet.checkpoint import read_checkpoint, save_checkpoint
from minunet.data import SyntheticDataset
from minunet.unet import UNet

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(sys.executable).parent / "minunet"
TINY = ["--samples", "12", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "2",
        "--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "--no-progress"]


def command():
    return [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "minunet"]


def _env():
    env = dict(os.environ)
    if not SCRIPT.is_file():  # `python -m minunet` must import this checkout
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def minunet(*args, cwd=None, timeout=300):
    """Run the command; returns the CompletedProcess (rc, stdout, stderr as text)."""
    return subprocess.run(command() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=_env())


def one_error_line(r, *fragments, rc=2):
    err = r.stderr.strip()
    assert r.returncode == rc, (r.returncode, r.stdout, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_the_installed_console_script_runs():
    if not SCRIPT.is_file():
        pytest.skip(f"no `minunet` console script next to {sys.executable} (pip install the project to get one)")
    r = subprocess.run([str(SCRIPT), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--overwrite" in r.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished 2-epoch run, made by the command."""
    out = tmp_path_factory.mktemp("cmd") / "run"
    r = minunet("train", *TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled folder of 6 synthetic 32x48 images with 3-class index masks."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    ds = SyntheticDataset(num_samples=6, image_size=(32, 48), num_classes=3, seed=3)
    for i in range(len(ds)):
        x, y = ds[i]
        pixels = np.clip((x[0] - x.min()) / (x.max() - x.min()) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"im{i}.png")
        Image.fromarray(y.astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    return root


def _copy_run(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# ---- 1. a run is never overwritten unasked -------------------------------------------------------

def test_out_refuses_a_folder_that_holds_a_run(run, tmp_path):
    out = _copy_run(run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = minunet("train", *TINY, "--out", out)
    one_error_line(r, f"--out {out} already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    r = minunet("train", *TINY, "--epochs", "1", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [json.loads(s)["epoch"] for s in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert read_checkpoint(out / "last.safetensors").epoch == 1


def test_out_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    one_error_line(minunet("train", *TINY, "--out", tmp_path / "file"), "--out", "a file of that name exists")
    one_error_line(minunet("train", *TINY, "--out", tmp_path / "file" / "run"), "--out", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_out_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_error_line(minunet("train", *TINY, "--out", ro / "run"), "--out", "not writable")
    finally:
        ro.chmod(0o755)


# ---- 2. a diverging run stops, says why, keeps its good checkpoints ---------------------------

def test_a_diverging_run_stops_with_the_step_and_the_likely_cause(tmp_path):
    out = tmp_path / "nan"
    r = minunet("train", *TINY, "--lr", "1e30", "--out", out)
    err = one_error_line(r, "diverged", "step 2", "the loss is nan", "last finite loss", "--lr 1e+30", rc=1)
    assert "No checkpoint had been written yet" in err
    assert not out.exists()  # nothing was written, so not even the folder


def test_predict_and_eval_refuse_a_checkpoint_with_non_finite_weights(folder, tmp_path):
    nn.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
    model.head.weight.data[0, 0, 0, 0] = np.nan
    save_checkpoint(tmp_path / "nan.safetensors", model)
    r = minunet("predict", "--model", tmp_path / "nan.safetensors", "--input", folder / "images",
                "--output", tmp_path / "pred", "--device", "cpu")
    one_error_line(r, "non-finite weights", "head.weight", "diverged")
    assert not (tmp_path / "pred").exists()
    r = minunet("eval", "--model", tmp_path / "nan.safetensors", "--data", folder, "--classes", "3",
                "--device", "cpu")
    one_error_line(r, "non-finite weights")


# ---- 3. extending a run ------------------------------------------------------------------------

def test_resume_with_more_epochs_plans_the_cosine_schedule_over_the_new_total(run, tmp_path):
    out = _copy_run(run, tmp_path)
    r = minunet("train", "--resume", out, "--epochs", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    lrs = [json.loads(s)["lr"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    peak, steps = 3e-3, 2  # the default --lr; 9 training images in batches of 4, the last one dropped
    assert read_checkpoint(out / "last.safetensors").scheduler_state["T_max"] == 4 * steps
    # epochs 1-2 as planned for 2 epochs; from the resumed step on, the plan over 4 epochs
    expected = [peak * (1 + np.cos(np.pi * e / 2)) / 2 for e in (1, 2)]
    expected += [peak * (1 + np.cos(np.pi * e / 4)) / 2 for e in (3, 4)]
    np.testing.assert_allclose(lrs, expected, atol=1e-12)
    assert lrs[2] > lrs[3] and lrs[3] == pytest.approx(0, abs=1e-12)  # decays to 0 at the new end


def test_resuming_a_finished_run_says_how_to_extend_it(run):
    one_error_line(minunet("train", "--resume", run, "--no-progress"),
                   "already done its 2 epochs", f"--resume {run} --epochs 4")
    one_error_line(minunet("train", "--resume", run, "--epochs", "1"), "--epochs 1 is fewer than the 2 epochs")


# ---- 4. SIGTERM is Ctrl-C -----------------------------------------------------------------------

def test_sigterm_saves_and_says_how_to_continue(tmp_path):
    out = tmp_path / "term"
    args = ["train", *TINY, "--epochs", "1000", "--out", str(out)]
    p = subprocess.Popen(command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for line in p.stdout:  # the first epoch ends: the loop (and its signal handlers) is running
            if line.startswith("epoch 1/"):
                break
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert "SIGTERM: stopping after this step" in stdout
    assert f"continue with: minunet train --resume {out}" in stdout
    stopped = read_checkpoint(out / "last.safetensors")
    assert 1 <= stopped.train_state["epoch"] < 1000 and "Traceback" not in stderr


# ---- 5. a failed start leaves no folder ------------------------------------------------------------

def test_bad_data_leaves_no_run_folder(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    Image.fromarray(np.full((32, 48), 7, np.uint8)).save(bad / "masks" / "im4.png")  # class 7 of 3
    r = minunet("train", *TINY, "--data", bad, "--classes", "3", cwd=tmp_path)
    one_error_line(r, "im4.png", "outside")
    assert not (tmp_path / "runs").exists()


# ---- in-process: where in a run the divergence happens ----------------------------------------------

def _poison(monkeypatch, at_step, gradient_only=False):
    """Make the `at_step`-th training loss (1-based) NaN, or, with gradient_only, keep its value
    but make its gradient NaN (the derivative of sqrt at 0 is infinite; times 0 it is NaN)."""
    from minunet import train as train_module
    original, steps = train_module.segmentation_loss, []

    def poisoned(logits, *args, **kwargs):
        loss = original(logits, *args, **kwargs)
        if logits.requires_grad:  # a training step, not validation
            steps.append(1)
            if len(steps) == at_step:
                loss = loss + ((logits * 0) ** 0.5).sum() if gradient_only else loss * float("nan")
        return loss
    monkeypatch.setattr(train_module, "segmentation_loss", poisoned)


def test_divergence_in_epoch_2_keeps_the_checkpoints_of_epoch_1(tmp_path, monkeypatch, capsys):
    from minunet.cli import main
    _poison(monkeypatch, at_step=3)  # 2 steps per epoch: the first step of epoch 2
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for fragment in ("epoch 2, batch 1 (step 3)", "the loss is nan", "the last finite loss was", "at step 2",
                     "--lr 0.003", f"Kept as they were: {out / 'last.safetensors'} (epoch 1"):
        assert fragment in err, err
    for name in ("last.safetensors", "best.safetensors"):
        ckpt = read_checkpoint(out / name)
        assert ckpt.epoch == 1 and all(np.isfinite(a).all() for a in ckpt.model_state.values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_non_finite_gradient_stops_before_the_step(tmp_path, monkeypatch, capsys):
    from minunet.cli import main
    _poison(monkeypatch, at_step=1, gradient_only=True)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "step 1): the gradient of" in err and "holds NaN or infinite values" in err, err
    assert "no finite loss came before it" in err and not (tmp_path / "run").exists()


# ---- 6, 7. eval: JSON alone on stdout; the options it takes from the checkpoint, named ----------

def test_eval_json_dash_prints_only_json_on_stdout(run):
    r = minunet("eval", "--model", run / "best.safetensors", "--json", "-", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)  # the whole of stdout
    assert scores["images"] == 3 and len(scores["dice"]) == 3
    assert "pixel accuracy" in r.stderr  # the table, for people, beside it


@pytest.fixture(scope="module")
def prefixed(folder, tmp_path_factory):
    """The folder's data with masks named m_<stem>.png, and a 1-epoch run trained on it with
    --mask-prefix m_ and class names."""
    root = tmp_path_factory.mktemp("prefixed")
    shutil.copytree(folder / "images", root / "images")
    (root / "masks").mkdir()
    for p in (folder / "masks").iterdir():
        shutil.copy(p, root / "masks" / f"m_{p.name}")
    r = minunet("train", *TINY, "--epochs", "1", "--data", root, "--classes", "3", "--mask-prefix", "m_",
                "--class-names", "a,b,c", "--out", root / "run")
    assert r.returncode == 0, r.stderr
    return root


def test_eval_names_the_options_it_takes_from_the_checkpoint(prefixed, folder):
    model = prefixed / "run" / "best.safetensors"
    r = minunet("eval", "--model", model, "--data", prefixed, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    taken = next(line for line in r.stdout.splitlines() if line.startswith("eval: from the checkpoint:"))
    for fragment in ("--mask-prefix m_", "--class-names a,b,c", "--classes 3"):
        assert fragment in taken, taken
    # options given win: the plain folder has no prefix, and the classes get other names
    r = minunet("eval", "--model", model, "--data", folder, "--mask-prefix", "", "--class-names", "x,y,z",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "--mask-prefix" not in r.stdout and "--class-names" not in r.stdout
    assert [line.split()[0] for line in r.stdout.splitlines()[3:6]] == ["x", "y", "z"], r.stdout


def test_eval_classes_that_differ_from_the_model(prefixed, folder):
    r = minunet("eval", "--model", prefixed / "run" / "best.safetensors", "--data", folder, "--classes", "5")
    one_error_line(r, "--classes 5, but the model", "has 3 classes")


# ---- 8. errors name the flag the user typed ------------------------------------------------------

PYTHON_SPEAK = ("mask_mode=", "num_classes", "gray_levels", "channels=", "val_fraction", "split_indices",
                "FolderDataset", "SyntheticDataset", "Augment", "Errno", "--previews")


@pytest.fixture(scope="module")
def odd_folders(folder, tmp_path_factory):
    """An empty data folder, and one whose images mix grayscale and colour."""
    root = tmp_path_factory.mktemp("odd")
    for sub in ("images", "masks"):
        (root / "empty" / sub).mkdir(parents=True)
    shutil.copytree(folder, root / "mixed")
    Image.open(root / "mixed" / "images" / "im0.png").convert("RGB").save(root / "mixed" / "images" / "im0.png")
    return root


@pytest.mark.parametrize("args, fragments", [
    (["--data", "{odd}/empty"], ["--data", "images/ folder", "holds no image files"]),
    (["--data", "{data}", "--mask-mode", "gray"], ["--mask-mode gray needs --gray-levels"]),
    (["--data", "{data}", "--mask-mode", "palette"], ["--mask-mode palette needs --palette FILE"]),
    (["--data", "{data}"], ["--mask-mode index (the default) needs --classes K"]),
    (["--data", "{odd}/mixed", "--classes", "3"], ["mix grayscale (im1.png) and colour (im0.png)",
                                                  "give --channels 1 or --channels 3"]),
    (["--data", "{data}", "--classes", "3", "--val-fraction", "0.01"], ["--val-fraction 0.01 holds out 0 of the 6"]),
])
def test_data_errors_name_the_flag(folder, odd_folders, tmp_path, args, fragments):
    args = [a.format(odd=odd_folders, data=folder) for a in args]
    err = one_error_line(minunet("train", *TINY, *args, cwd=tmp_path), *fragments)
    assert not any(p in err for p in PYTHON_SPEAK), err
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_lists_the_flags_that_may_change(run):
    err = one_error_line(minunet("train", "--resume", run, "--lr", "0.1"), "--lr 0.1 differs from the resumed run's",
                         "only --epochs, --device, --precision, --cuda-graph, --out, --progress may change")
    assert "--previews" not in err


# ---- 9. palette masks: a void colour, and every palette form -------------------------------------------

COLOURS = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]
VOID = [255, 255, 255]


@pytest.fixture(scope="module")
def palette_folder(folder, tmp_path_factory):
    """The folder's masks drawn as RGB colours, with a void (white) block in each corner."""
    root = tmp_path_factory.mktemp("palette")
    shutil.copytree(folder / "images", root / "images")
    (root / "masks").mkdir()
    for p in (folder / "masks").iterdir():
        rgb = np.asarray(COLOURS, np.uint8)[np.asarray(Image.open(p))]
        rgb[:4, :4] = VOID
        Image.fromarray(rgb).save(root / "masks" / p.name)
    return root


@pytest.mark.parametrize("form", [
    [{"sky": COLOURS[0]}, {"road": COLOURS[1]}, {"car": COLOURS[2]}],
    [{"name": "sky", "color": COLOURS[0]}, {"name": "road", "color": COLOURS[1]}, {"name": "car", "color": COLOURS[2]}],
])
def test_palette_forms_and_a_void_colour_left_unscored(palette_folder, tmp_path, form):
    (tmp_path / "palette.json").write_text(json.dumps(form))
    out = tmp_path / "run"
    r = minunet("train", *TINY, "--epochs", "1", "--data", palette_folder, "--mask-mode", "palette",
                "--palette", tmp_path / "palette.json", "--ignore-index", "255", "--out", out)
    assert r.returncode == 0, r.stderr
    r = minunet("eval", "--model", out / "best.safetensors", "--json", "-", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["class_names"] == ["sky", "road", "car"]


def test_help_says_how_to_leave_a_void_colour_unscored():
    r = minunet("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "A void colour (pixels not to score) is left out of the palette and needs --ignore-index" in text
    assert '{"name": [r, g, b], ...}' in text and '[{"name": [r, g, b]}, ...]' in text


def test_a_palette_in_no_accepted_form_lists_the_forms(palette_folder, tmp_path):
    (tmp_path / "palette.json").write_text(json.dumps({"colours": "red"}))
    one_error_line(minunet("train", *TINY, "--data", palette_folder, "--mask-mode", "palette", "--palette",
                           tmp_path / "palette.json"), "--palette", "is not a colour", "accepted: a JSON file")


# ---- 10. every option's value is checked for what it means, before any work ------------------------

@pytest.mark.parametrize("args, fragments", [
    (["--data", "{data}", "--classes", "3", "--image-size", "64"],
     ["--image-size 64, the training crop, is larger than image", "give at most --image-size 32"]),
    (["--seed", "-1"], ["--seed must be an integer >= 0, got -1"]),
    (["--class-weights", "1,-2,1"], ["--class-weights 1.0,-2.0,1.0: expected numbers >= 0"]),
])
def test_option_values_are_checked_for_meaning(folder, tmp_path, args, fragments):
    args = [a.format(data=folder) for a in args]
    err = one_error_line(minunet("train", *TINY, *args, cwd=tmp_path), *fragments)
    assert not any(p in err for p in PYTHON_SPEAK), err
    assert not (tmp_path / "runs").exists()


def test_predict_tile_and_output_are_checked_first(run, folder, tmp_path):
    one_error_line(minunet("predict", "--model", run / "best.safetensors", "--input", folder / "images",
                           "--output", tmp_path / "p", "--tile", "30", "--device", "cpu"),
                   "--tile 30 does not fit the model", "nearest valid input sizes: 28, 32")
    (tmp_path / "file").write_text("x")
    one_error_line(minunet("predict", "--model", run / "best.safetensors", "--input", folder / "images",
                           "--output", tmp_path / "file", "--device", "cpu"), "--output", "a file of that name exists")


@pytest.mark.parametrize("args, fragments", [
    (["train", "--momentum", "1.5"], ["--momentum must lie in [0, 1), got 1.5"]),
    (["train", "--lr", "inf"], ["--lr must be a positive number, got inf"]),
    (["train", "--classes", "7"], ["--classes 7: the synthetic set draws 2 to 5 classes"]),
    (["train", "--image-size", "8"], ["--image-size 8: the synthetic images are 16 pixels at least"]),
    (["train", "--image-size", "30"], ["--image-size 30 does not fit the model", "nearest valid input sizes: 28, 32"]),
    (["train", "--mask-mode", "gray", "--ignore-index", "9"], ["--mask-mode, --ignore-index describe folder data"]),
    (["train", "--data", "{data}", "--classes", "3", "--class-names", "a,b"], ["--class-names gives 2 names for 3"]),
    (["train", "--data", "{data}", "--classes", "3", "--class-names", "a,b,a"], ["a named twice"]),
    (["train", "--data", "{data}", "--classes", "3", "--ignore-index", "1"], ["--ignore-index 1 is one of"]),
    (["train", "--data", "{data}", "--classes", "3", "--class-weights", "1,2"], ["--class-weights gives 2 values"]),
    (["train", "--data", "{data}", "--mask-mode", "gray", "--gray-levels", "0,1,1"], ["--gray-levels 0,1,1: the"]),
    (["train", "--data", "{data}", "--mask-mode", "gray", "--gray-levels", "0,1,2", "--classes", "4"],
     ["--classes 4, but --gray-levels 0,1,2 defines 3 classes"]),
    (["train", "--data", "{data}", "--classes", "3", "--gray-levels", "0,1,2"],
     ["--gray-levels is for --mask-mode gray, but the mask mode is index"]),
    (["train", "--data", "{data}", "--mask-mode", "palette", "--palette", "{data}/none.json"], ["no such file"]),
    (["train", "--data", "{data}", "--mask-mode", "binary", "--classes", "3"], ["--classes 3, but --mask-mode binary"]),
    (["eval", "--model", "{run}/best.safetensors", "--json", "{data}/no/such/s.json"], ["--json", "does not exist"]),
    (["eval", "--model", "{run}/best.safetensors", "--tile", "30"], ["--tile 30 does not fit the model"]),
    (["predict", "--model", "{run}/best.safetensors", "--input", "{data}/nothing", "--output", "{data}/p"],
     ["--input", "does not exist"]),
])
def test_more_option_values_are_checked_for_meaning(run, folder, tmp_path, monkeypatch, capsys, args, fragments):
    from minunet.cli import main
    monkeypatch.chdir(tmp_path)
    args = [a.format(data=folder, run=run) for a in args]
    extra = TINY if args[0] == "train" else ["--device", "cpu"]
    rc = main([args[0], *extra, *args[1:]])  # the case's options last: they win
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    assert not any(p in err for p in PYTHON_SPEAK), err
    assert not (tmp_path / "runs").exists()


# ---- 11. predict shows its progress over tiles and files ---------------------------------------------

def test_predict_shows_a_progress_bar_over_the_tiles_of_all_files(run, tmp_path):
    from minunet.predict import Tiler, load_model
    for name, (h, w) in (("a.png", (300, 260)), ("b.png", (90, 70))):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w), np.uint8)).save(tmp_path / name)
    model, _ = load_model(run / "best.safetensors")
    total = Tiler(model, 32).count(300, 260) + Tiler(model, 32).count(90, 70)
    r = minunet("predict", "--model", run / "best.safetensors", "--input", tmp_path, "--output", tmp_path / "out",
                "--tile", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    bar = r.stderr.replace("\r", "\n")
    assert f"{total}/{total}" in bar and "tile" in bar and "image 2/2 b.png" in bar, bar
    assert "2 image(s) predicted" in r.stdout
    r = minunet("predict", "--model", run / "best.safetensors", "--input", tmp_path / "b.png", "--output",
                tmp_path / "out", "--no-progress", "--device", "cpu")
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.parametrize("tta", [False, True])
def test_the_tile_count_is_what_run_reports(tta):
    from minunet.predict import Tiler
    nn.manual_seed(0)
    tiler = Tiler(UNet(base_channels=2, depth=1), 16, tta=tta)  # with TTA, 4 of the 8 passes see 24 x 40
    done = []
    tiler.run(np.zeros((1, 1, 40, 24), np.float32), progress=done.append)
    assert sum(done) == tiler.count(40, 24) and max(done) <= tiler.batch_size


# ---- 12. the pictures: a legend of the classes, integer epochs, the best epoch marked ---------------------

@pytest.fixture
def figures(monkeypatch):
    """The matplotlib Figures saved while the test runs."""
    import matplotlib.figure
    saved, save = [], matplotlib.figure.Figure.savefig

    def spy(fig, path, **kwargs):
        saved.append(fig)
        save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def test_the_run_folder_pictures(run, tmp_path, figures):
    from minunet.figures import plot_curves, plot_predictions
    from minunet.predict import palette
    assert Image.open(run / "curves.png").size[0] > 0 and Image.open(run / "predictions.png").size[0] > 0
    history = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]  # the command's run
    plot_curves(tmp_path / "curves.png", history, ["a", "b", "c"], best_epoch=2)
    for ax in figures[-1].axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks == [1, 2], ticks  # whole epochs only
        assert "best epoch 2" in [t.get_text() for t in ax.get_legend().get_texts()]
    y = np.zeros((8, 8), np.int64)
    y[:2], y[-1] = 2, 255  # class 0, class 2 and an ignored row
    plot_predictions(tmp_path / "pred.png", [(np.arange(64, dtype=np.float32).reshape(1, 8, 8), y, np.ones((8, 8), np.int64))],
                     3, ["sky", "road", "car"])
    fig = figures[-1]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["0: sky", "1: road", "2: car", "not scored"]
    swatches = [tuple(np.round(np.asarray(p.get_facecolor()[:3]) * 255)) for p in legend.get_patches()]
    assert swatches[:3] == [tuple(c) for c in palette(3)] and swatches[3] == (255, 255, 255)
    truth = fig.axes[1].get_images()[0].get_array()  # the ground truth panel: class 0 in its own colour
    np.testing.assert_array_equal(truth[4, 4], palette(3)[0])
    np.testing.assert_array_equal(truth[0, 0], palette(3)[2])
    np.testing.assert_array_equal(truth[-1, 0], [255, 255, 255])


def test_sigterm_outside_the_training_loop_is_reported(run, folder, tmp_path, monkeypatch, capsys):
    """predict, eval, or train before its loop: a message and status 143, as Ctrl-C gives 130."""
    from minunet import predict
    from minunet.cli import main

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(predict.Tiler, "run", terminated)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["predict", "--model", str(run / "best.safetensors"), "--input", str(folder / "images"),
               "--output", str(tmp_path / "p"), "--device", "cpu", "--no-progress"])
    assert rc == 128 + signal.SIGTERM and capsys.readouterr().err.strip() == "minunet: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
