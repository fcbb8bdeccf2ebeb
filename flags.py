"""argparse types for the commands' flags: a bad value is refused where it is parsed, with argparse's one-line
`error:` and exit status 2, before any work starts and before any output is opened."""
import argparse
import math


def _bounds(kind, lo, hi, lo_open, hi_open):
    """'a finite number in [0, 1]', 'an integer >= 1', ...: what number() accepts, for its messages."""
    what = "an integer" if kind is int else "a finite number"
    if lo == -math.inf and hi == math.inf:
        return what
    if hi == math.inf:
        return f"{what} {'>' if lo_open else '>='} {lo:g}"
    if lo == -math.inf:
        return f"{what} {'<' if hi_open else '<='} {hi:g}"
    return f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def number(kind=float, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """An argparse type for one finite int or float within lo..hi (open ends with lo_open, hi_open): nan and inf
    are refused everywhere, since no flag of this project has a meaning for them."""
    bounds = _bounds(kind, lo, hi, lo_open, hi_open)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None
        inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return value
    return parse


def numbers(kind=float, **bounds):
    """An argparse type for a comma list of number(kind, **bounds), e.g. --w 0,0.5,1."""
    one = number(kind, **bounds)

    def parse(text):
        return [one(v.strip()) for v in text.split(",")]
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
