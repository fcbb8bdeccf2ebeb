"""Run-time plumbing that every command shares: the device, mixed precision, one-line errors, atomic writes of files
and of PNG grids."""
import argparse
import contextlib
import math
import os
import sys
import time

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


def native_bf16():
    """The name of this CPU's bf16 hardware ('AMX' or 'AVX-512 BF16'), or None when it has none and bf16 is emulated."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {  # torch before 2.12 or so
        "amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    return "AMX" if caps.get("amx_bf16") else "AVX-512 BF16" if caps.get("avx512_bf16") else None


def fast_path(device, amp="auto", channels_last=True):
    """(amp, channels_last, why): the one rule for the precision and memory layout of every command's network.

    'auto' is bf16 autocast in channels_last on CUDA and on a CPU with bf16 hardware (AMX, AVX-512 BF16), where it ran
    1.8-3.7x as fast as fp32 (README, "Measuring speed"); it is fp32 NCHW on any other CPU, where bf16 is emulated and
    ran 10-40x slower than fp32, and channels_last slowed fp32 convolutions down (measured on an AVX2 CPU). An explicit
    amp is kept as it is; channels_last=False (train.py --no-channels-last) keeps NCHW everywhere, and on a CPU
    channels_last goes with reduced precision only, since fp32's CPU convolutions are written for NCHW."""
    device, hardware = torch.device(device), native_bf16()
    if amp == "auto" and device.type == "cpu":
        amp = "bf16" if hardware else "none"
        why = f"auto: native bf16, {hardware}" if hardware else f"auto: no native bf16 on this CPU " \
            f"({torch.backends.cpu.get_cpu_capability()}), so fp32"
    elif amp == "auto":
        amp, why = "bf16", f"auto: {device.type}"
    else:
        why = f"--amp {amp}"
    channels_last = channels_last and (device.type != "cpu" or amp != "none")
    return amp, channels_last, why


def speed_line(device, amp, channels_last, why):
    """What a command prints first: 'cpu, amp bf16, channels_last (auto: native bf16, AMX)'."""
    return f"{torch.device(device).type}, amp {amp}, {'channels_last' if channels_last else 'NCHW'} ({why})"


def autocast(device, amp="auto"):
    """The autocast context for amp 'bf16', 'fp16' or 'none'; 'auto' (or None) follows fast_path."""
    if amp in (None, "auto"):
        amp = fast_path(device, "auto")[0]
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def warn(message):
    """A warning as one line on stderr, 'warning: ...', the form of every command's warnings (no file, line or source)."""
    print(f"warning: {message}", file=sys.stderr)


def progress(what="images", every=10.0, prefix="", file=None):
    """A progress(done, total) callback that prints '[prefix]8/24 images, 2.06 images/s, eta 0.1 min' at most every
    `every` seconds, and at the end; the rate is since the callback was made."""
    start, last = time.time(), -math.inf

    def report(done, total):
        nonlocal last
        now = time.time()
        if now - last < every and done < total:
            return
        last, rate = now, done / max(now - start, 1e-9)
        print(f"{prefix}{done}/{total} {what}, {rate:.2f} {what}/s, eta {(total - done) / rate / 60:.1f} min",
              file=file or sys.stdout, flush=True)
    return report


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
