"""argparse types for the commands' flags: a bad value is refused where it is parsed, with argparse's one-line
`error:` and exit status 2, before any work starts and before any output is opened."""
import argparse
import math
import os


# --amp of every command that runs the U-Net: one set of choices, one default, one help text
AMP = dict(choices=["auto", "bf16", "fp16", "none"], default="auto", help="autocast dtype; none: fp32 exactly (no TF32), "
           "NCHW; auto: bf16 on GPUs of compute capability 8.0 and newer and on a CPU with bf16 hardware (AMX, AVX-512 "
           "BF16), fp16 on GPUs of 7.x, else none")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is the one line `prog: error: message` (no usage line), still with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(description, **kw):
    """The ArgumentParser of every command: defaults shown in --help, errors on one line."""
    return _Parser(description=description, **{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kw})


def _bounds(kind, lo, hi, lo_open, hi_open, multiple=1):
    """'a finite number in [0, 1]', 'an integer >= 1', ...: what number() accepts, for its messages."""
    what = f"a multiple of {multiple}" if multiple > 1 else "an integer" if kind is int else "a finite number"
    if lo == -math.inf and hi == math.inf:
        return what
    if hi == math.inf:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    if lo == -math.inf:
        return f"{what} {'<' if hi_open else '<='} {hi:g}"
    return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def number(kind=float, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, multiple=1):
    """An argparse type for one finite int or float within lo..hi (open ends with lo_open, hi_open; ints also a
    multiple of `multiple`): nan and inf are refused everywhere, since no flag of this project has a meaning for them."""
    bounds = _bounds(kind, lo, hi, lo_open, hi_open, multiple)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None
        inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside and (multiple == 1 or value % multiple == 0)):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return value
    return parse


def numbers(kind=float, empty_ok=False, **bounds):
    """An argparse type for a comma list of number(kind, **bounds), e.g. --w 0,0.5,1; with empty_ok, '' is []."""
    one = number(kind, **bounds)

    def parse(text):
        return [] if empty_ok and not text.strip() else [one(v.strip()) for v in text.split(",")]
    return parse


def some_of(options):
    """An argparse type for a comma list of some of `options`, in the order given (e.g. --configs fp32-nchw,bf16-cl)."""
    def parse(text):
        values = [v.strip() for v in text.split(",")]
        if bad := [v for v in values if v not in options]:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(options)}, got {bad[0]!r}")
        return values
    return parse


def interval(text):
    """'LO,HI' with 0 <= LO < HI (HI may be inf), the noise-level interval of guidance."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    if not (math.isfinite(lo) and 0 <= lo < hi) or math.isnan(hi):
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 <= LO < HI (HI may be inf), got {text!r}")
    return lo, hi


def unit_range(text):
    """'LO,HI' with 0 <= LO < HI <= 1: a range of diffusion times t."""
    lo, hi = interval(text)
    if hi > 1:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def existing_file(text):
    """A path to a readable, non-empty file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file")
    if os.path.getsize(text) == 0:
        raise argparse.ArgumentTypeError(f"{text} is empty")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def folder_or(*names, what="a folder"):
    """An argparse type for one of the names (e.g. 'cifar10') or an existing folder, described as `what`."""
    expected = f"expected {' or '.join(map(repr, names))} or {what}"

    def parse(text):
        if text in names or os.path.isdir(text):
            return text
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r} ({'a file' if os.path.exists(text) else 'no such folder'})")
    return parse


def _creatable(path, kind):
    """path, if it is a `kind` ("file" or "directory") already or could become one: nothing in the way of it is a
    file, and its nearest existing folder is writable. Nothing is created here."""
    if kind == "directory" and os.path.isfile(path) or kind == "file" and os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a {'file' if kind == 'directory' else 'directory'}, expected a {kind}")
    parent = os.path.abspath(path) if kind == "directory" else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, so the {kind} cannot be created")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: {parent} is not writable")
    return path


def output_dir(text):
    """A folder that exists or can be created (created later, when the command writes to it)."""
    return _creatable(text, "directory")


def output_file(text):
    """A file that exists or can be created (written later, atomically)."""
    return _creatable(text, "file")
