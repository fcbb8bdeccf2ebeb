"""Run-time plumbing that every command shares: the device, the one rule for precision and memory layout (fast_path),
progress and warning lines, one-line errors, clean stops on SIGTERM and SIGINT, a lock on the folder a command writes,
atomic writes of files and PNG grids."""
import argparse
import contextlib
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

try:
    import fcntl
except ImportError:  # Windows, where the project is not tested: folders are then written without a lock
    fcntl = None


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


def fast_path(device, amp="auto", channels_last=True, ch=None):
    """(amp, channels_last, why): the one rule for the precision and memory layout of every command's network.

    'auto' is bf16 on a GPU of compute capability 8.0 or newer and on a CPU with bf16 hardware (AMX, AVX-512 BF16),
    where it ran 1.8-3.7x (AMX) and 1.4-2.1x (AVX-512 BF16) as fast as fp32 (RESULTS.md, "Speed on a CPU"). Below
    8.0 cuDNN has no bf16 convolutions, so 'auto' is fp16 (train.py adds the loss scaler) from 7.0, the first tensor
    cores, and fp32 before that. On any other CPU bf16 is emulated and ran 5-9x slower than fp32, so 'auto' is fp32
    there. An explicit amp is kept as it is.
    channels_last goes with bf16 and fp16 only: fp32 is NCHW everywhere (on a CPU channels_last gave it no consistent
    gain, 0.87-1.16x on AVX2), and channels_last=False (--no-channels-last) keeps NCHW for every precision. On a CPU
    'auto' also keeps NCHW for a network of base width ch < 64: with AVX-512 BF16 (AMX not measured) bf16
    channels_last changed the default U-Net's speed (ch 128) by -5% to +12% against bf16 NCHW, but cost the small one
    (ch 32) 14-35% at 16 x 16 and 0-11% at 32 x 32. An explicit amp keeps channels_last, so bench.py can time both. ch=None: the width is not known,
    counted as wide."""
    device, auto = torch.device(device), amp == "auto"
    if auto and device.type == "cpu":
        amp = "bf16" if (hardware := native_bf16()) else "none"
        why = f"auto: native bf16, {hardware}" if hardware else f"auto: no native bf16 on this CPU " \
            f"({torch.backends.cpu.get_cpu_capability()}), so fp32"
    elif auto:
        major, minor = torch.cuda.get_device_capability(device)
        amp = "bf16" if major >= 8 else "fp16" if major >= 7 else "none"
        why = f"auto: {device.type}, compute capability {major}.{minor}" + {
            "bf16": "", "fp16": ": no native bf16, so fp16 with loss scaling", "none": ": no tensor cores, so fp32"}[amp]
    else:
        why = f"--amp {amp}"
    channels_last = channels_last and amp != "none"
    if auto and channels_last and device.type == "cpu" and ch is not None and ch < 64:
        channels_last, why = False, f"{why}; NCHW for ch {ch} < 64"
    return amp, channels_last, why


def speed_line(device, amp, channels_last, why):
    """What a command prints first: 'cpu, amp bf16, channels_last (auto: native bf16, AMX)'."""
    return f"{torch.device(device).type}, amp {amp}, {'channels_last' if channels_last else 'NCHW'} ({why})"


def autocast(device, amp="auto"):
    """The context of a forward pass in amp 'bf16' or 'fp16', or in 'none': fp32 exactly (fp32_exactly, which can be
    entered once: take a new context for each pass). 'auto' follows fast_path."""
    if amp == "auto":
        amp = fast_path(device, "auto")[0]
    if amp == "none":
        return fp32_exactly(device)
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


@contextlib.contextmanager
def fp32_exactly(device):
    """fp32 without autocast, and without the TF32 that CUDA takes by default in cuDNN's fp32 convolutions (and in
    matmuls after torch.set_float32_matmul_precision('high')); the settings are restored after."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        for k, s in zip(knobs, saved):
            k.fp32_precision = s


def tune_cuda(device, amp):
    """The run-wide CUDA settings of train.py and bench.py: cuDNN times its kernels once for the fixed shapes, and amp
    'none' stays fp32 exactly in the backward pass too, which runs outside the forward pass's autocast context."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        if amp == "none":
            torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"


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


class Stopped(Exception):
    """SIGTERM or SIGINT, raised by CleanStop's handler wherever the main thread is."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WriteError(Exception):
    """A file that could not be written (disk full, quota, permissions, size limit); the message names it."""


def lock_folder(folder):
    """Lock folder (made if need be) for this process, or end the command: one line naming the folder and the process
    that holds it, exit status 2, nothing written. The lock is the OS's, on folder/.lock, and lasts while the returned
    file is open: the OS drops it when the process ends, however it ends (kill -9 too), so no stale lock is left.
    .lock holds the holder's process id and command, for that line; once no process holds it, it means nothing."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    command = os.path.basename(sys.argv[0])
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        print(f"{command}: error: {folder} is in use by {holder}: wait for it to end, or use another folder",
              file=sys.stderr)
        raise SystemExit(2) from None
    if not os.path.exists(f.name) or not os.path.samestat(os.fstat(f.fileno()), os.stat(f.name)):
        f.close()  # the last holder removed this .lock as we locked it (CleanStop.hold): lock the one there now
        return lock_folder(folder)
    f.truncate(0)
    f.write(f"process {os.getpid()} ({command})\n")
    f.flush()
    return f


class CleanStop:
    """`with CleanStop(finished) as stop:` around a command's work. SIGTERM (kill, timeout, SLURM, Kubernetes) and
    SIGINT (Ctrl-C) end it with one line, `stopped by SIGTERM <stop.finished>` (none if quiet: torchrun's other ranks),
    and exit status 128 + the signal number, as a shell reports a job that a signal ended; a WriteError ends it with
    `error: <its message>` and status 1. The signal raises Stopped where the work is; write_atomic keeps the old file.

    stop.defer = True (training) turns a signal into stop.signum instead, for the loop to stop where it chooses; repeated
    signals are then ignored (a terminal and a scheduler may both send one) until defer is False again, as it is during
    the final save, which a second signal then abandons.

    stop.hold(folder) locks the folder the command writes (lock_folder) until the work ends, however it ends; a folder
    that hold made and the work then wrote nothing into (bad input, a stop) is removed again, lock file and all."""

    def __init__(self, finished, quiet=False):
        self.finished, self.quiet, self.defer, self.signum, self.lock = finished, quiet, False, None, None

    def __enter__(self):  # a signal that the parent ignores stays ignored (Ctrl-C and a script's background job)
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def hold(self, folder):
        self.made, self.lock = not os.path.isdir(folder), lock_folder(folder)

    def handle(self, signum, frame):
        if not self.defer:
            raise Stopped(signum)
        self.signum = self.signum or signum

    def __exit__(self, kind, e, traceback):
        if self.lock is not None:
            folder = os.path.dirname(self.lock.name)
            if self.made and os.listdir(folder) == [".lock"]:
                os.remove(self.lock.name)
                os.rmdir(folder)
            self.lock.close()
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if isinstance(e, Stopped):
            if not self.quiet:
                print(f"stopped by {e} {self.finished}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        if isinstance(e, WriteError):
            raise SystemExit(f"error: {e}") from None


def _write_error(path, e):
    """The WriteError of an OSError, or of the RuntimeError that torch.save raises while handling one; else None."""
    e = e.__context__ if isinstance(e, RuntimeError) else e
    return WriteError(f"cannot write {path}: {e.strerror or e}") if isinstance(e, OSError) else None


def write_atomic(path, write):
    """Write a file through write(f) to a temporary name, then rename it: a crash leaves the old file or the new one,
    and syncing the folder makes the rename itself survive a power cut. A failed write raises WriteError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C and SIGTERM included: leave no half-written temporary behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if (error := _write_error(path, e)) is not None:
            raise error from e
        raise
    if os.name == "posix":  # the rename is on disk once the folder is; some network file systems cannot sync one
        with contextlib.suppress(OSError):
            folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def append_line(path, text):
    """Append one line to path (a log), or raise WriteError naming it."""
    try:
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError as e:
        raise _write_error(path, e) from e


def save_grid(images, path, nrow, row_names=()):
    """Tile uint8 images [N, H, W, 3] into rows of nrow and write them as one PNG, each of row_names (a class grid's
    class names) in white at the left of its row, in PIL's default font."""
    n, h, w, _ = images.shape
    font = ImageFont.load_default()
    margin = max((font.getbbox(name)[2] + 4 for name in row_names), default=0)
    grid = np.zeros((-(-n // nrow) * h, margin + nrow * w, 3), np.uint8)
    for i, img in enumerate(images):
        top, left = (i // nrow) * h, margin + (i % nrow) * w
        grid[top:top + h, left:left + w] = img
    picture = Image.fromarray(grid)
    for row, name in enumerate(row_names):
        _, above, _, below = font.getbbox(name)
        ImageDraw.Draw(picture).text((2, row * h + (h - above - below) // 2), name, fill="white", font=font)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def save_class_grid(images, path, names, max_cols):
    """save_grid for images in balanced_labels order over the classes `names`: a row per class, named, black where a
    row runs short, at most max_cols images a row, so that the grid of a 50,000-image run can still be looked at.
    Returns the number of columns."""
    rows, cols = len(names), min(-(-len(images) // len(names)), max_cols)
    tiles = np.zeros((cols * rows, *images.shape[1:]), np.uint8)
    tiles[:len(images[:cols * rows])] = images[:cols * rows]
    tiles = tiles.reshape(cols, rows, *images.shape[1:]).swapaxes(0, 1)  # image i is of class i % rows
    save_grid(tiles.reshape(-1, *images.shape[1:]), path, cols, names)
    return cols
