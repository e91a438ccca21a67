"""Tests of util/checkpoint.py: official-layout checkpoints round-trip exactly and other configs are refused."""
import argparse
import re
import sys

import pytest
import torch

from denoiser import Denoiser
from model_jit import JiT
from util.checkpoint import load_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state


def trained_denoiser(args, perturb, seed=0):
    """A Denoiser whose weights, EMA track 1 and EMA track 2 all differ, and an AdamW that has taken one step."""
    torch.manual_seed(seed)
    den = Denoiser(args)
    perturb(den, std=0.05, seed=seed + 1)
    den.update_ema()
    perturb(den, std=0.05, seed=seed + 2)
    den.update_ema()
    optimizer = torch.optim.AdamW([p for p in den.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed + 3)
    for p in den.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return den, optimizer


def save(path, den, optimizer, epoch, args):
    """A checkpoint as the release writes it (its own torch.save of the official dict, no resume_state)."""
    torch.save(dict(model=den.state_dict(), model_ema1=den.ema_state_dict(1), model_ema2=den.ema_state_dict(2),
                    optimizer=optimizer.state_dict() if optimizer is not None else {}, epoch=epoch, args=args), path)
    return str(path)


def test_roundtrip_is_bit_exact(make_args, perturb, tmp_path):
    args = make_args("--img_size", "8", "--ema_decay1", "0.9", "--ema_decay2", "0.5")
    den, optimizer = trained_denoiser(args, perturb, seed=0)
    ema1, ema2 = den.ema_state_dict(1), den.ema_state_dict(2)
    key = "net.blocks.2.attn.qkv.weight"
    assert not torch.equal(ema1[key], den.state_dict()[key]) and not torch.equal(ema1[key], ema2[key])
    path = str(tmp_path / "checkpoint-last.pth")
    torch.manual_seed(5)
    resume_state = {"epoch": 8, "step": 3, "rng": [rng_state()]}
    draws = torch.rand(4)
    save_checkpoint(path, den, optimizer, 7, args, resume_state)  # the writer main_jit.py uses

    torch.manual_seed(99)
    fresh = Denoiser(args)  # another initialisation
    assert not torch.equal(fresh.state_dict()[key], den.state_dict()[key])
    checkpoint = read_checkpoint(path)
    load_checkpoint(fresh, path, checkpoint)
    assert checkpoint["epoch"] == 7
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"] == args
    assert list(fresh.state_dict()) == list(den.state_dict())
    for k, v in den.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for track, ema in ((1, ema1), (2, ema2)):
        loaded = fresh.ema_state_dict(track)
        for k, v in ema.items():
            assert torch.equal(loaded[k], v), (track, k)
        for e, ref in zip(fresh.ema_params[track - 1], den.ema_params[track - 1]):
            assert torch.equal(e, ref)
    # the loaded EMA tracks keep updating in step with the original ones
    den.update_ema()
    fresh.update_ema()
    for e, ref in zip(fresh.ema_params[1], den.ema_params[1]):
        assert torch.equal(e, ref)
    # the optimizer state comes back too
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    opt2.load_state_dict(checkpoint["optimizer"])
    for (p1, p2) in zip(optimizer.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert torch.equal(optimizer.state[p1]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
    # the official layout, plus where to continue: the RNG state comes back and repeats the same draws
    raw = read_checkpoint(path)
    assert set(raw) == {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args", "resume_state"}
    assert raw["resume_state"]["epoch"] == 8 and raw["resume_state"]["step"] == 3
    set_rng_state(raw["resume_state"]["rng"][0])
    assert torch.equal(torch.rand(4), draws)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temporary file left


def test_a_save_copies_no_weight_or_ema_tensor(make_args, perturb, tmp_path, monkeypatch):
    """torch.save receives the live weights and both EMA tracks themselves: a clone of the two tracks at every save
    took 8 bytes per parameter of GPU memory on rank 0 (16 GB for JiT-G/16)."""
    args = make_args("--img_size", "8", "--ema_decay1", "0.9", "--ema_decay2", "0.5")
    den, optimizer = trained_denoiser(args, perturb)
    saved = []
    torch_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: saved.append(obj) or torch_save(obj, f, *a, **k))
    save_checkpoint(str(tmp_path / "checkpoint-last.pth"), den, optimizer, 0, args)
    names = [name for name, _ in den.named_parameters()]
    assert len(saved) == 1 and len(names) == len(den.ema_params[0])
    for key, weights in (("model", list(den.parameters())), ("model_ema1", den.ema_params[0]),
                         ("model_ema2", den.ema_params[1])):
        for name, tensor in zip(names, weights, strict=True):
            assert saved[0][key][name].data_ptr() == tensor.data_ptr(), (key, name)
    assert not torch.equal(saved[0]["model_ema1"][names[-1]], saved[0]["model_ema2"][names[-1]])  # two tracks


def test_a_save_fsyncs_the_file_renames_it_then_fsyncs_the_folder(make_args, tmp_path, monkeypatch):
    """The order that makes a checkpoint durable: the complete temporary file fsynced, then renamed over the path,
    then its folder fsynced (the rename itself). Without the first fsync a crash after the rename can leave the
    new name pointing at a file whose data never reached the disk."""
    import os

    args = make_args("--img_size", "8")
    den = Denoiser(args)
    path = str(tmp_path / "checkpoint-last.pth")
    calls = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):  # what the descriptor is, and for a file how many bytes it holds at that moment
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync", target, os.path.getsize(target) if os.path.isfile(target) else None))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append(("replace", src, dst)) or replace(src, dst))
    save_checkpoint(path, den, torch.optim.AdamW(den.parameters()), 0, args)
    tmp = f"{path}.tmp.{os.getpid()}"
    real = os.path.realpath
    assert calls == [("fsync", real(tmp), os.path.getsize(path)), ("replace", tmp, path),
                     ("fsync", real(tmp_path), None)]


def test_checkpoint_without_ema_initialises_both_tracks_from_weights(make_args, perturb, tmp_path):
    args = make_args("--img_size", "8")
    torch.manual_seed(3)
    den = perturb(Denoiser(args), std=0.05, seed=4)
    path = tmp_path / "bare.pth"
    torch.save({"model": den.state_dict()}, path)
    fresh = Denoiser(args)
    load_checkpoint(fresh, str(path), read_checkpoint(str(path)))
    for track in (1, 2):
        for k, v in fresh.ema_state_dict(track).items():
            assert torch.equal(v, den.state_dict()[k]), (track, k)


@pytest.fixture
def saved_tiny(make_args, tmp_path):
    """A JiT-T/4 checkpoint at 16 px with 10 classes."""
    args = make_args("--img_size", "16")
    torch.manual_seed(0)
    den = Denoiser(args)
    return save(tmp_path / "tiny.pth", den, None, 1, args)


def test_other_img_size_is_refused_naming_key_and_shapes(make_args, saved_tiny):
    den = Denoiser(make_args("--img_size", "8"))
    before = {k: v.clone() for k, v in den.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(den, saved_tiny, read_checkpoint(saved_tiny))
    msg = str(info.value)
    assert "net.pos_embed" in msg and "(1, 16, 192)" in msg and "(1, 4, 192)" in msg
    assert msg.index("(1, 16, 192)") < msg.index("(1, 4, 192)")  # the checkpoint's shape, then the model's
    assert saved_tiny in msg
    for k, v in den.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])


def test_other_class_count_is_refused(make_args, saved_tiny):
    den = Denoiser(make_args("--img_size", "16", "--class_num", "5"))
    with pytest.raises(ValueError, match=re.escape("net.y_embedder.embedding_table.weight") + r".*"
                       + re.escape("(11, 192)") + r".*" + re.escape("(6, 192)")):
        load_checkpoint(den, saved_tiny, read_checkpoint(saved_tiny))


def test_other_patch_size_is_refused(make_args, saved_tiny):
    den = Denoiser(make_args("--model", "JiT-T/2", "--img_size", "8"))  # same 4x4 grid, patch 2 instead of 4
    with pytest.raises(ValueError, match=re.escape("net.x_embedder.proj1.weight") + r".*"
                       + re.escape("(32, 3, 4, 4)") + r".*" + re.escape("(32, 3, 2, 2)")):
        load_checkpoint(den, saved_tiny, read_checkpoint(saved_tiny))


def shallow_net(depth):
    """JiT-T/4 layout at 16 px with another depth."""
    return JiT(input_size=16, patch_size=4, hidden_size=192, depth=depth, num_heads=3, bottleneck_dim=32,
               num_classes=10, in_context_len=8, in_context_start=2)


def test_other_depth_is_refused(make_args, tmp_path, saved_tiny):
    args = make_args("--img_size", "16")
    den = Denoiser(args)  # depth 6
    other = Denoiser(args)
    other.net = shallow_net(5)
    path = save(tmp_path / "depth5.pth", other, None, 1, args)
    with pytest.raises(ValueError, match=re.escape("key net.blocks.5.norm1.weight is missing")):
        load_checkpoint(den, path, read_checkpoint(path))
    other.net = shallow_net(7)
    path = save(tmp_path / "depth7.pth", other, None, 1, args)
    with pytest.raises(ValueError, match=re.escape("unexpected key net.blocks.6.norm1.weight")):
        load_checkpoint(den, path, read_checkpoint(path))


def test_mismatched_ema_entry_is_refused(make_args, tmp_path):
    args = make_args("--img_size", "16")
    den = Denoiser(args)
    small = Denoiser(make_args("--img_size", "8"))
    torch.save(dict(model=den.state_dict(), model_ema1=small.ema_state_dict(1), model_ema2=den.ema_state_dict(2),
                    optimizer={}, epoch=0, args=args), tmp_path / "bad_ema.pth")
    with pytest.raises(ValueError, match=r"\[model_ema1\].*net\.pos_embed"):
        path = str(tmp_path / "bad_ema.pth")
        load_checkpoint(Denoiser(args), path, read_checkpoint(path))


def test_missing_file_and_foreign_file(make_args, tmp_path):
    den = Denoiser(make_args("--img_size", "8"))
    missing = str(tmp_path / "nowhere" / "checkpoint-last.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_checkpoint(den, missing, read_checkpoint(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_checkpoint(den, str(tmp_path), read_checkpoint(str(tmp_path)))  # a folder is not a checkpoint file
    torch.save({"state": 1}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no 'model' entry"):
        foreign = str(tmp_path / "foreign.pth")
        load_checkpoint(den, foreign, read_checkpoint(foreign))


def mapped_file(tensor):
    """The file whose mapping holds the tensor's data (Linux /proc/self/maps), or None for ordinary memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_checkpoints_are_memory_mapped_and_old_format_files_still_load(make_args, perturb, tmp_path):
    """Every rank of a node maps the file (one copy in the page cache) instead of reading it into its own memory;
    files in torch's pre-1.6 format, which cannot be mapped, load as before."""
    args = make_args()
    den, optimizer = trained_denoiser(args, perturb)
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint(path, den, optimizer, 3, args)
    ckpt = read_checkpoint(path)
    tensors = [*ckpt["model"].values(), *ckpt["model_ema1"].values(),
               *(v for state in ckpt["optimizer"]["state"].values() for v in state.values())]
    assert {mapped_file(t) for t in tensors} == {str(path)}
    legacy = tmp_path / "legacy.pth"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    old = read_checkpoint(legacy)
    assert mapped_file(old["model"]["net.final_layer.linear.weight"]) is None
    assert all(torch.equal(old["model"][k], v) for k, v in ckpt["model"].items()) and old["epoch"] == 3
    reloaded = Denoiser(args)
    load_checkpoint(reloaded, legacy, old)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), den.state_dict().values()))
