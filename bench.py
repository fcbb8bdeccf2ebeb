"""Throughput of the three costly parts, for the speed tables of RESULTS.md (not a test):

    python bench.py                      # train (all three losses), sample and FID features on the default device
    python bench.py --what cpu-table     # every loss, sampling and FID in fp32/bf16 x NCHW/channels_last, and GFLOP/s
    python bench.py --what quality --ckpt runs/first/ckpt.pt --ref REF   # does bf16 sampling change FID and KID?

Training runs the real losses in runtime.fast_path's precision and layout (--amp and --no-channels-last as in
train.py) with train.py's CUDA settings (runtime.tune_cuda), the guidance-free loss with a copy of the model as its
teacher; sampling runs sample_images for CFG at w = 2 (two network evaluations a step) and at w = 0, as a guidance-free
model samples (one); FID runs fid.inception_features, in fp32. Weights are random: speed does not depend on them.
"""
import argparse
import copy
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import fid
from diffusion import Schedule
from inception import FIDError, FIDInceptionV3, load_inception
from flags import AMP, existing_file, number, parser, some_of
from losses import aligned_loss, guidance_free_loss, standard_loss
from model import UNet
from runtime import autocast, fast_path, fp32_exactly, native_bf16, pick_device, speed_line, tune_cuda
from sample import CheckpointError, balanced_labels, load_checkpoint, sample_checkpoint, sample_images

# the CPU table's U-Nets, the default (35.75M) and a CPU run's small one (1.07M), each with its batch on 2 CPU cores
NETWORKS = {"default": (dict(), 16), "small": (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=()), 64)}
CONFIGS = {"fp32-nchw": ("none", False), "fp32-cl": ("none", True), "bf16-nchw": ("bf16", False), "bf16-cl": ("bf16", True)}


def timed(fn, repeats, device, units=1):
    """(units/s, GFLOP/s) of fn, `units` a call (images, network evaluations), over `repeats` calls after a warm-up
    (cuDNN autotuning, allocator, lazy init) whose FLOPs torch.utils.flop_counter counts: 2 a multiply-add of each
    matmul and convolution, forward and backward, none for the memory-bound rest; on CUDA the clock waits for device."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None  # alone: the current GPU
    with FlopCounterMode(display=False) as counter:
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    seconds = (time.perf_counter() - t0) / repeats
    return units / seconds, counter.get_total_flops() / seconds / 1e9


def peak(precision, device, repeats=3):
    """{operation: GFLOP/s} of a 2048 x 2048 matmul and a 3x3 convolution (256 channels, 32 x 32, batch 16) in
    precision, fp32 or bf16: the faster is the peak as measured now; a matmul alone understates it on a CPU."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, x = (torch.randn(*shape, device=device, dtype=dtype) for shape in [(2048, 2048), (16, 32, 32, 256)])
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    with fp32_exactly(device), torch.inference_mode():  # x [16, 32, 32, 256], permuted: channels_last, not copied
        return {what: timed(fn, repeats, device)[1] for what, fn in [
            ("matmul", lambda: a @ a), ("convolution", lambda: conv(x.permute(0, 3, 1, 2)))]}


def time_training(model, batch, amp, channels_last, device, repeats):
    """{loss: (images/s, GFLOP/s)} of one optimizer step of each loss on random data (Adam, fused on CUDA)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    schedule = Schedule("linear")
    x = torch.rand(batch, 3, model.img_size, model.img_size, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    rates = {}
    for name, loss_fn in [("standard", lambda: standard_loss(model, schedule, x, y, null_class=10)),
                          ("aligned", lambda: aligned_loss(model, schedule, x, y, w=2.0, null_class=10)),
                          ("guidance-free", lambda: guidance_free_loss(model, teacher, schedule, x, y, w=2.0,
                                                                       null_class=10))]:
        def step():
            with autocast(device, amp):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates[name] = timed(step, repeats, device, batch)
    return rates


def time_sampling(model, batch, steps, w, amp, channels_last, device, repeats):
    """(network evaluations per second: images x steps, twice that for w != 0; GFLOP/s) of sample_images."""
    model.eval()
    run = lambda: sample_images(model, Schedule("linear"), np.arange(batch) % 10, null_class=10, w=w, steps=steps,
                                batch_size=batch, device=device, amp=amp, channels_last=channels_last)
    return timed(run, repeats, device, batch * steps * (1 if w == 0 else 2))


def time_fid(batch, channels_last, device, repeats):
    """(images/s, GFLOP/s) of fid.inception_features (fp32, TF32 off) on random 32x32 images, with random weights."""
    inception = FIDInceptionV3().eval().requires_grad_(False).to(device)  # random weights: same cost
    images = np.random.default_rng(0).integers(0, 256, (2 * batch, 32, 32, 3), dtype=np.uint8)
    return timed(lambda: fid.inception_features(inception, images, batch, device, progress=False,
                                                channels_last=channels_last), repeats, device, len(images))


def cpu_table(networks, configs, repeats, steps, device, batch=None):
    """RESULTS.md's "Speed on a CPU" table: a row per measurement (U-Nets at 16 x 16 and 32 x 32), a column per
    precision and layout: rate (ratio to column 1, fp32 NCHW), GFLOP/s, share of peak(); batch: all batch sizes."""
    peaks, rows = {p: peak(p, device) for p in dict.fromkeys(c.split("-")[0] for c in configs)}, {}
    for name, size in [(name, size) for name in networks if name != "inception" for size in (16, 32)]:
        kw, b, net = NETWORKS[name][0], batch or NETWORKS[name][1], f"{name} U-Net {size}x{size}"
        for config in configs:
            torch.manual_seed(0)
            model = UNet(**kw, img_size=size).to(device)
            for loss, figures in time_training(model, b, *CONFIGS[config], device, repeats).items():
                rows.setdefault(f"{net}, train {loss}, batch {b} (img/s)", {})[config] = figures
            figures = time_sampling(model, b, steps, 2.0, *CONFIGS[config], device, repeats)
            rows.setdefault(f"{net}, guided sampling, {b} images (img-evals/s)", {})[config] = figures
            print(f"measured {net}, {config}", flush=True)
    for config in [c for c in configs if c.startswith("fp32") and "inception" in networks]:  # fp32 only: = pytorch-fid
        rows.setdefault(f"FID Inception features, batch {batch or 50} (img/s)", {})[config] = time_fid(
            batch or 50, CONFIGS[config][1], device, repeats)
    top = {c: max(peaks[c.split("-")[0]].values()) for c in configs}  # a column's peak: its precision's faster one
    lines = ["a cell: rate (ratio to the first column), GFLOP/s, share of the peak, the faster of " + "; ".join(
        f"{p} " + ", ".join(f"{what} {g:.0f}" for what, g in ops.items()) for p, ops in peaks.items()) + " GFLOP/s",
             "", "| measurement | GFLOP each | " + " | ".join(configs) + " |", "|---|---:|" + "---:|" * len(configs)]
    for what, figures in rows.items():
        base, (rate, gflops) = figures.get(configs[0], (None,))[0], next(iter(figures.values()))
        cells = [f"{r:.1f}{f' ({r / base:.2f}x)' if base and c != configs[0] else ''}, {g:.0f}, {g / top[c]:.0%}"
                 if c in figures else "-" for c in configs for r, g in [figures.get(c, (0, 0))]]
        lines.append(f"| {what} | {gflops / rate:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality(ckpt, ref, n, steps, w, device, fid_batch):
    """Does bf16 sampling change what is measured? FID and KID against ref (at most n of its images, as fid.py --n) of
    n images from ckpt in fp32 from seeds 0.., in fp32 from seeds n.. (the noise floor) and in bf16 from seeds 0..;
    fp32 is exact, NCHW without TF32 on CUDA too (--amp none)."""
    fid.check_input(ref)
    model, config = load_checkpoint(ckpt, device)
    labels, inception = balanced_labels(n, config["unet"]["num_classes"]), load_inception(None, device)
    mu_ref, sigma_ref, _, feats_ref = fid.input_statistics(ref, inception, device=device, features=True, max_images=n)
    subset = min(1000, n, len(feats_ref))
    lines, scores = [f"{n} images, {steps} DDIM steps, w = {w:g}, KID over 100 subsets of {subset}", "",
                     "| sampled in | seeds | FID | KID |", "|---|---|---:|---:|"], []
    for amp, seed in [("none", 0), ("none", n), ("bf16", 0)]:
        images = sample_checkpoint(model, config, labels, w=w, steps=steps, seed=seed, device=device, amp=amp)
        feats = fid.inception_features(inception, images, fid_batch, device, progress=False)
        kid = fid.feature_metrics(feats.astype(fid.FEATURES_DTYPE), feats_ref, kid=True, kid_subset_size=subset,
                                  device=device)
        scores.append((fid.frechet_distance(*fid.feature_statistics(feats), mu_ref, sigma_ref), kid["kid"]))
        lines.append(f"| {'fp32' if amp == 'none' else amp} | {seed}..{seed + n - 1} | {scores[-1][0]:.2f} | "
                     f"{kid['kid']:.5f} ± {kid['kid_std']:.5f} |")
    (f0, k0), (f1, k1), (fb, kb) = scores
    within = lambda low, seeds: "within the seed noise" if abs(low) < abs(seeds) else "NOT within the seed noise"
    lines += ["", f"bf16 - fp32 (same seeds): FID {fb - f0:+.2f}, KID {kb - k0:+.5f}; fp32 seeds {n}.. - seeds 0..: "
              f"FID {f1 - f0:+.2f}, KID {k1 - k0:+.5f}; bf16 is {within(fb - f0, f1 - f0)} on FID and "
              f"{within(kb - k0, k1 - k0)} on KID"]
    return "\n".join(lines)


def main(argv=None):
    p = parser(__doc__.split("\n")[0], formatter_class=argparse.HelpFormatter)
    p.add_argument("--what", choices=["train", "sample", "fid", "all", "cpu-table", "quality"], default="all",
                   help="what to time (default: all = train, sample, fid; cpu-table: RESULTS.md's CPU table; quality: "
                   "FID and KID of --ckpt's samples in bf16 against fp32 and a second fp32 seed)")
    p.add_argument("--ckpt", type=existing_file, help="quality: the train.py checkpoint to sample")
    p.add_argument("--ref", default="cifar10-train", help="quality: fid.py's reference input (default: cifar10-train)")
    p.add_argument("--n", type=number(int, lo=2), default=1000, help="quality: images per set (>= 2; default 1000)")
    p.add_argument("--w", type=number(float, lo=-1), default=1.0, help="quality: guidance scale (>= -1; default 1)")
    p.add_argument("--device", type=pick_device, default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--amp", **{**AMP, "help": AMP["help"] + " (not cpu-table, which times each)"})
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW, as train.py's flag does (not cpu-table)")
    p.add_argument("--ch", type=number(int, lo=32, multiple=32), default=128, help="U-Net width (default: 128)")
    p.add_argument("--batch-size", type=number(int, lo=1), help="default: 128 on CUDA, 8 on the CPU; cpu-table: its own")
    p.add_argument("--iters", type=number(int, lo=1), help="timed repeats, >= 1 (default: 20 on CUDA, 2 on the CPU)")
    p.add_argument("--sample-steps", type=number(int, lo=1), help="DDIM steps a sampling call (default: 10, cpu-table 2)")
    p.add_argument("--networks", type=some_of([*NETWORKS, "inception"]), default=[*NETWORKS, "inception"],
                   help="cpu-table: the networks to time (default: default,small,inception: the U-Nets and FID's)")
    p.add_argument("--configs", type=some_of(CONFIGS), default=list(CONFIGS),
                   help="cpu-table: precisions and layouts, the first is the ratios' base (default: all four)")
    args = p.parse_args(argv)
    device, cuda = args.device, args.device.type == "cuda"
    repeats = args.iters or (20 if cuda else 2)
    name = torch.cuda.get_device_name(device) if cuda else getattr(torch.cpu, "get_capabilities", dict)().get("cpu_name")
    print(f"device {device} ({name or 'unknown'}; bf16 hardware: {native_bf16() or 'none'}), {torch.get_num_threads()} "
          f"CPU threads, torch {torch.__version__}")
    if args.what == "quality":
        if args.ckpt is None:
            p.error("--what quality needs --ckpt")
        try:
            print(quality(args.ckpt, args.ref, args.n, args.sample_steps or 25, args.w, device, args.batch_size or 50))
        except (CheckpointError, FIDError) as e:
            p.error(str(e))
        return
    if args.what == "cpu-table":
        print(cpu_table(args.networks, args.configs, repeats, args.sample_steps or 2, device, args.batch_size))
        return
    amp, channels_last, why = fast_path(device, args.amp, not args.no_channels_last, args.ch)
    tune_cuda(device, amp)
    batch = args.batch_size or (128 if cuda else 8)
    print(speed_line(device, amp, channels_last, why) + f", batch {batch}")

    model = UNet(ch=args.ch).to(device)
    if args.what in ("train", "all"):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for name, (rate, _) in time_training(model, batch, amp, channels_last, device, repeats).items():
            print(f"train {name:13s}: {rate:8.1f} img/s; 100k steps take {1e5 * batch / rate / 3600:.2f} h")
        if cuda:
            print(f"train: peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if args.what in ("sample", "all"):
        steps, rates = args.sample_steps or 10, {}
        for w, who in [(2.0, "CFG at w=2 (standard, aligned)"), (0.0, "w=0 (guidance-free at its W)")]:
            evals = time_sampling(model, batch, steps, w, amp, channels_last, device, repeats)[0]
            rates[w] = evals / (1 if w == 0 else 2) / 50
            print(f"sample {who:31s}: {rates[w]:8.2f} img/s at 50 steps ({evals:.0f} network evaluations/s)")
        print(f"sample: one network evaluation a step is {rates[0.0] / rates[2.0]:.2f}x the images/s of two")
    if args.what in ("fid", "all"):
        rate = time_fid(batch, None, device, repeats)[0]
        print(f"fid features: {rate:8.1f} img/s (batch {batch}, fp32, TF32 off)")


if __name__ == "__main__":
    main()
