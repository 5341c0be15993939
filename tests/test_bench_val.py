"""`megagpt bench val`: a nanoGPT-format checkpoint and a megagpt run scored on the same windows of a val.bin."""

import pickle

import numpy as np
import pytest
import torch
from helpers import CPU_CONFIG, tiny_overrides

from benchmarks.val import main, score
from megagpt.config import ModelConfig, load_config
from megagpt.errors import UserError
from megagpt.model import GPT
from megagpt.train import train

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65, sorted


def _val_bin(tmp_path, n=1000, chars=CHARS):
    ids = np.random.default_rng(0).integers(0, len(chars), n).astype(np.uint16)
    ids.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate(chars)), "vocab_size": len(chars)}))
    return tmp_path / "val.bin", torch.from_numpy(ids.astype(np.int64))


def _reference(model, tokens, T):
    """float64 cross-entropy over the non-overlapping windows, written out here."""
    losses = []
    model = model.double()
    with torch.no_grad():
        for s in range(0, len(tokens), T):
            if s + T + 1 > len(tokens):  # the last window needs its T + 1 tokens
                break
            logits = model(tokens[s:s + T][None])[0][0]
            logp = torch.log_softmax(logits.double(), -1)
            losses.append(-logp[torch.arange(T), tokens[s + 1:s + T + 1]].mean())
    return torch.stack(losses).mean().item(), len(losses)


def test_a_nanogpt_checkpoint_is_scored_on_every_window(tmp_path, capsys):
    val, tokens = _val_bin(tmp_path, n=1009)  # 1009 = 63 windows of 16 + 1: the last one fits exactly
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=65)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**shape, dropout=0.0))
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "model_args": shape}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert main([str(tmp_path / "ckpt.pt"), "--val-bin", str(val), "--block-size", "16"]) == 0
    line = capsys.readouterr().out.splitlines()[-1].split()
    want, windows = _reference(model, tokens, 16)
    assert int(line[1]) == windows == 63
    assert float(line[2]) == pytest.approx(want, abs=1e-4)


def test_a_run_is_scored_and_a_vocabulary_mismatch_is_refused(shakespeare_dataset, tmp_path):
    run = tmp_path / "run"
    train(load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=2, sample_tokens=0,
                                                 tensorboard=False)), run)
    val, tokens = _val_bin(tmp_path)
    from megagpt.inference import load_for_inference

    model = load_for_inference(run)[0]
    loss, windows = score(model, tokens, 32)
    assert (loss, windows) == pytest.approx(_reference(model, tokens, 32), abs=1e-4)
    assert main([str(run), "--val-bin", str(val), "--block-size", "32"]) == 0
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": dict(enumerate(CHARS[::-1]))}))
    with pytest.raises(UserError, match="vocabulary differs"):
        main([str(run), "--val-bin", str(val), "--block-size", "32"])


# ---------------------------------------------------------------- bad input: one line naming the file or flag
def _nanogpt_ckpt(tmp_path, block_size=16):
    shape = dict(n_layer=1, n_head=2, n_embd=32, block_size=block_size, bias=False, vocab_size=65)
    torch.save({"model": GPT(ModelConfig(**shape, dropout=0.0)).state_dict(), "model_args": shape},
               tmp_path / "ckpt.pt")
    return str(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("block_size, named", [("0", "--block-size 0: must be at least 1"),
                                               ("17", "--block-size 17: longer than"),
                                               ("5000", "too few for one window of --block-size 5000")])
def test_a_block_size_that_gives_no_window_is_refused(block_size, named, tmp_path):
    val, _ = _val_bin(tmp_path)
    with pytest.raises(UserError, match=named):
        main([_nanogpt_ckpt(tmp_path), "--val-bin", str(val), "--block-size", block_size])


def test_a_file_that_is_no_nanogpt_checkpoint_is_named(tmp_path):
    val, _ = _val_bin(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"other": 1}, tmp_path / "dict.pt")
    for name in ("garbage.pt", "dict.pt"):
        with pytest.raises(UserError, match=rf"{name}: not a nanoGPT ckpt.pt"):
            main([str(tmp_path / name), "--val-bin", str(val), "--block-size", "16"])


def test_a_val_bin_of_odd_bytes_ids_outside_the_vocabulary_or_a_bad_meta_is_named(tmp_path):
    ckpt = _nanogpt_ckpt(tmp_path)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match="odd.bin: 3 bytes, not a whole number"):
        main([ckpt, "--val-bin", str(tmp_path / "odd.bin")])
    np.array([1, 2, 60000, 3] * 10, dtype=np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(UserError, match="id 60000 is outside"):
        main([ckpt, "--val-bin", str(tmp_path / "big.bin"), "--block-size", "16"])
    val, _ = _val_bin(tmp_path)
    (tmp_path / "meta.pkl").write_text("garbage\n")
    with pytest.raises(UserError, match="meta.pkl: not nanoGPT's meta.pkl"):
        main([ckpt, "--val-bin", str(val), "--block-size", "16"])
