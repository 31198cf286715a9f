"""Checkpoints: an exact round trip, atomic replacement, and clear errors for broken files."""
import os

import numpy as np
import pytest

from minunet import functional as F
from minunet import nn, optim
from minunet.autograd import tensor
from minunet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from minunet.unet import UNet

CONFIG = dict(in_channels=1, num_classes=3, base_channels=4, depth=2, batch_norm=True)  # 0-d buffers too


def _trained(seed=0):
    """A tiny UNet after two Adam steps, so the optimizer has arrays and a step count."""
    nn.manual_seed(seed)
    model = UNet(**CONFIG)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    sched = optim.CosineAnnealingLR(opt, T_max=10)
    rng = np.random.default_rng(seed)
    x = tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    y = rng.integers(0, 3, size=(2, 8, 8))
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert np.shape(a[k]) == np.shape(b[k]), k  # 0-d buffers (num_batches_tracked) stay 0-d
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_restores_model_optimizer_scheduler_and_progress(tmp_path):
    model, opt, sched = _trained()
    path = tmp_path / "ckpt.safetensors"
    train_state = {"rng": np.random.default_rng(7).bit_generator.state, "batch": 3}
    save_checkpoint(path, model, opt, sched, epoch=5, best_metric=0.75,
                    train_config={"lr": 0.01}, train_state=train_state)

    nn.manual_seed(99)  # different initial values everywhere
    model2 = UNet(**CONFIG)
    opt2 = optim.Adam(model2.parameters(), lr=1.0)
    sched2 = optim.CosineAnnealingLR(opt2, T_max=3)
    ckpt = load_checkpoint(path, model2, opt2, sched2)

    _assert_same_state(model.state_dict(), model2.state_dict())
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"][0]["lr"] == sd2["param_groups"][0]["lr"]
    assert list(sd2["param_groups"][0]["betas"]) == [0.9, 0.999]
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        assert sd2["state"][i]["step"] == 2
        _assert_same_state({k: v for k, v in sd["state"][i].items() if k != "step"},
                           {k: v for k, v in sd2["state"][i].items() if k != "step"})
    assert sched2.last_epoch == sched.last_epoch and sched2.T_max == 10
    assert (ckpt.epoch, ckpt.best_metric, ckpt.train_config) == (5, 0.75, {"lr": 0.01})
    assert ckpt.train_state == train_state
    assert ckpt.model_config == model.config


def test_resumed_optimizer_continues_bit_for_bit(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, sched)
    model2 = UNet(**CONFIG)
    opt2 = optim.Adam(model2.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    x = tensor(np.ones((1, 1, 8, 8), np.float32))
    y = np.zeros((1, 8, 8), np.int64)
    for m, o in ((model, opt), (model2, opt2)):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    _assert_same_state(model.state_dict(), model2.state_dict())


def test_file_is_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open
    model, opt, sched = _trained()
    save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, epoch=1)
    with safe_open(tmp_path / "c.safetensors", framework="numpy") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "model.head.weight" in keys and "optim.state.0.exp_avg" in keys
    assert meta["minunet.format"] == "minunet-checkpoint/1" and '"depth": 2' in meta["model_config"]


def test_truncated_file_is_reported(tmp_path):
    model, opt, sched = _trained()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, sched)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"c\.safetensors is truncated or not a safetensors file"):
        read_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_other_architecture_names_the_differing_fields(tmp_path):
    model, _, _ = _trained()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model)
    other = UNet(**{**CONFIG, "base_channels": 8, "depth": 3})
    before = other.state_dict()
    with pytest.raises(CheckpointError, match=r"another architecture: base_channels: checkpoint 4, model 8; "
                                              r"depth: checkpoint 2, model 3"):
        load_checkpoint(path, other)
    _assert_same_state(before, other.state_dict())  # nothing was overwritten


def test_other_architecture_without_config_names_keys_and_shapes(tmp_path):
    model, _, _ = _trained()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model)

    class Bare(nn.Module):  # a model without .config: only keys and shapes can be compared
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(4, 5, 1)
    with pytest.raises(CheckpointError, match=r"unexpected keys bottleneck\.0\.weight, .*; shape mismatch "
                                              r"head\.bias checkpoint \(3,\) vs model \(5,\), "
                                              r"head\.weight checkpoint \(3, 4, 1, 1\) vs model \(5, 4, 1, 1\)"):
        load_checkpoint(path, Bare())


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, opt, sched, epoch=1)
    good = path.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) between writing and renaming
    monkeypatch.setattr(os, "replace", crash)
    model2, opt2, sched2 = _trained(seed=1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model2, opt2, sched2, epoch=2)
    monkeypatch.undo()

    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.safetensors"]  # no temporary left behind
    assert load_checkpoint(path, UNet(**CONFIG)).epoch == 1


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, opt, sched, epoch=1)
    good = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, opt, sched, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["last.safetensors"]
