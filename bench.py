"""Throughput of the three costly parts, for the README's cost figures (not a test):

    python bench.py                      # train (all three losses), sample and FID features on the default device
    python bench.py --what train --batch-size 128 --iters 50

Training runs the real losses on the default U-Net with train.py's speed settings (bf16 autocast, channels_last
on CUDA; the guidance-free loss with a copy of the model as its teacher, as the EMA is in train.py); sampling runs
sample_images for CFG at w = 2 (two network evaluations a step) and at w = 0, which is how a guidance-free model
samples the same w_eff (one); FID runs fid.inception_features. Weights are random: speed does not depend on them.
"""
import argparse
import copy
import time

import numpy as np
import torch

import fid
from diffusion import Schedule
from inception import FIDInceptionV3
from flags import number, parser
from losses import aligned_loss, guidance_free_loss, standard_loss
from model import UNet
from runtime import autocast, pick_device
from sample import sample_images


def timed(fn, repeats, sync):
    fn()  # warm-up: cuDNN autotuning, allocator, lazy init
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    p = parser(__doc__.split("\n")[0], formatter_class=argparse.HelpFormatter)
    p.add_argument("--what", choices=["train", "sample", "fid", "all"], default="all",
                   help="what to time (default: all)")
    p.add_argument("--device", type=pick_device, default="auto",
                   help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--ch", type=number(int, lo=32, multiple=32), default=128,
                   help="U-Net width, a multiple of 32 (default: 128, the default model)")
    p.add_argument("--batch-size", type=number(int, lo=1), default=None,
                   help=">= 1 (default: 128 on CUDA, 8 on the CPU)")
    p.add_argument("--iters", type=number(int, lo=1), default=None,
                   help="timed repeats, >= 1 (default: 20 on CUDA, 2 on the CPU)")
    p.add_argument("--sample-steps", type=number(int, lo=1), default=10,
                   help="DDIM steps per timed sampling call (>= 1; default: 10)")
    args = p.parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    batch, repeats = args.batch_size or (128 if cuda else 8), args.iters or (20 if cuda else 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = "bf16" if cuda else "none"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, batch {batch}, amp {amp}")

    model = UNet(ch=args.ch).to(device, memory_format=fmt)
    schedule, x = Schedule("linear"), torch.rand(batch, 3, 32, 32, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    if args.what in ("train", "all"):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=cuda)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
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
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            s = timed(step, repeats, sync)
            mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
            print(f"train {name:13s}: {1 / s:7.2f} steps/s, {batch / s:8.1f} img/s{mem}; "
                  f"100k steps take {1e5 * s / 3600:.2f} h")
    if args.what in ("sample", "all"):
        model.eval()
        labels, rates = np.arange(batch) % 10, {}
        for w, who in [(2.0, "CFG at w=2 (standard, aligned)"), (0.0, "w=0 (guidance-free at its W)")]:
            s = timed(lambda: sample_images(model, schedule, labels, null_class=10, w=w, steps=args.sample_steps,
                                            batch_size=batch, device=device, amp=amp), repeats, sync)
            rates[w] = batch / s * args.sample_steps / 50
            print(f"sample {who:31s}: {rates[w]:8.2f} img/s at 50 steps ({batch * args.sample_steps / s:.0f} image-steps/s)")
        print(f"sample: one network evaluation a step is {rates[0.0] / rates[2.0]:.2f}x the images/s of two")
    if args.what in ("fid", "all"):
        inception = FIDInceptionV3().eval().requires_grad_(False).to(device)  # random weights: same cost
        images = np.random.default_rng(0).integers(0, 256, (2 * batch, 32, 32, 3), dtype=np.uint8)
        s = timed(lambda: fid.inception_features(inception, images, batch, device, progress=False), repeats, sync)
        print(f"fid features: {len(images) / s:8.1f} img/s (batch {batch}, fp32, TF32 off)")


if __name__ == "__main__":
    main()
