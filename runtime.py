"""Run-time plumbing that every command shares: the device, mixed precision, one-line errors, atomic writes of files
and of PNG grids."""
import argparse
import contextlib
import os

import numpy as np
import torch
from PIL import Image


def pick_device(name):
    """torch.device for 'auto' (CUDA when there is one, else the CPU), 'cpu', 'cuda', 'cuda:1', ...

    The argparse type of every command's --device: an unknown name, or CUDA on a machine without it, raises
    ArgumentTypeError, which argparse prints as a one-line error with exit status 2."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {name}, but CUDA is not available")
    return device


def autocast(device, amp=None):
    """The autocast context for amp 'bf16', 'fp16' or 'none'; None picks bf16 on CUDA and none elsewhere."""
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def one_line(e):
    """An exception as 'Type: first line of its message', for errors that must fit on one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def write_atomic(path, write):
    """Write a file through write(f) to a temporary name, then rename it: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: leave no half-written temporary behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def class_grid(images, rows, max_cols=100):
    """(tiles, nrow) for save_grid: images in balanced_labels order over `rows` classes, one row per class, black
    where a row runs short; at most max_cols per row, so a 50,000-image run still gives a viewable grid."""
    cols = min(-(-len(images) // rows), max_cols)
    tiles = np.zeros((cols * rows, *images.shape[1:]), np.uint8)
    tiles[:len(images[:cols * rows])] = images[:cols * rows]
    return tiles.reshape(cols, rows, *images.shape[1:]).swapaxes(0, 1).reshape(-1, *images.shape[1:]), cols


def save_grid(images, path, nrow):
    """Tile uint8 images [N, H, W, 3] into rows of nrow and write them as one PNG."""
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * h, nrow * w, 3), np.uint8)
    for i, img in enumerate(images):
        grid[(i // nrow) * h:(i // nrow + 1) * h, (i % nrow) * w:(i % nrow + 1) * w] = img
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
