"""Guided DDIM sampling from a train.py checkpoint: python sample.py --ckpt runs/aligned-w2/ckpt.pt --w 5 --steps 50

writes samples.npz (OpenAI ADM's format: arr_0 uint8 [N, H, W, 3], arr_1 labels) and grid.png (a named row per class)
to --out. Its functions need no argparse: train.py (sample grids) and sweep.py use them.
"""
import os

import numpy as np
import torch
from PIL import Image

from diffusion import Schedule, ancestral_sample, ddim_sample
from distributed import gather_on_main, init_distributed, rank_and_world, share
from flags import AMP, existing_file, interval, number, output_dir, parser
from model import UNet
from runtime import CleanStop, autocast, fast_path, one_line, pick_device, progress, save_class_grid, speed_line, \
    write_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not written by this project's train.py."""


def load_checkpoint(path, device="cpu", ema=True):
    """(model, config) from a train.py checkpoint, the EMA weights unless ema=False, in eval mode on device.

    Raises CheckpointError, with a one-line message, for a missing, unreadable or foreign file.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except Exception as e:  # torch.load's messages run to many lines and suggest weights_only=False: name the error only
        raise CheckpointError(f"{path} is not a checkpoint of this project (torch.load: {type(e).__name__})") from e
    try:
        config = ckpt["config"]
        losses = ("standard", "aligned", "guidance-free")
        if config["loss"] not in losses or len(config["class_names"]) != config["unet"]["num_classes"]:
            raise ValueError(f"loss {config['loss']!r} with {len(config['class_names'])} class names")
        Schedule(config["schedule"])
        model = UNet(**config["unet"])
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint of this project ({one_line(e)})") from e
    return model.to(device).eval().requires_grad_(False), config


def effective_w(config, w):
    """The effective guidance of sampling a checkpoint at w (losses.py): w for a standard one, (w - w_t) / (1 + w_t)
    for an aligned one trained at w_t, W + w (1 + W) for a guidance-free one trained at W."""
    if config["loss"] == "aligned":
        return (w - config["w"]) / (1 + config["w"])
    if config["loss"] == "guidance-free":
        return config["w"] + w * (1 + config["w"])
    return w


def effective_to_sampling_w(config, w_eff):
    """The sampling w whose effective guidance is w_eff, effective_w's inverse: w_t + w_eff (1 + w_t) for an aligned
    checkpoint, (w_eff - W) / (1 + W) for a guidance-free one, w_eff for a standard one."""
    if config["loss"] == "aligned":
        return config["w"] + w_eff * (1 + config["w"])
    if config["loss"] == "guidance-free":
        return (w_eff - config["w"]) / (1 + config["w"])
    return w_eff


def balanced_labels(n, classes):
    """n int64 labels cycling through classes (class ids, or a count k for 0..k-1): every prefix is balanced, and
    label i does not depend on n, so the first images of a long run are those of a short one."""
    classes = range(classes) if isinstance(classes, int) else classes
    return np.resize(np.asarray(classes, dtype=np.int64), n)


@torch.no_grad()
def sample_images(model, schedule, labels, *, null_class, w=0.0, steps=50, eta=0.0, clip_x0=True, seed=0,
                  batch_size=None, device="cpu", amp="auto", channels_last=True, progress=None, sampler="ddim",
                  v=0.3, guidance_interval=None, w_unguided=0.0):
    """Draw one image per label, as uint8 [N, H, W, 3]; image i comes from its own generator seeded seed + i.

    sampler "ddim" (with eta) or "ancestral" (Ho & Salimans' Algorithm 2, with v); guidance_interval and
    w_unguided as in diffusion.py (w_unguided, the checkpoint's unguided scale, is the w of w_eff = 0).

    The generators live on the CPU, so the starting noise of image i is the same on every device and
    for every batch size. That makes it safe to halve the batch and retry on CUDA out-of-memory, so the
    default batch_size=None starts large there, at 1024; on CPU it is 8, where small batches run fastest.
    amp and channels_last go through runtime.fast_path ('auto': bf16 in channels_last on recent GPUs and on a CPU with
    bf16 hardware, NCHW there for a network narrower than ch 64, see there; channels_last=False keeps NCHW), which also
    sets the model's memory format.
    progress(done, total) runs after each batch.
    """
    device = torch.device(device)
    size = (3, model.img_size, model.img_size)
    amp, channels_last = fast_path(device, amp, channels_last, model.ch)[:2]
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def eps_model(z, t, y):
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return model(z, t, y)

    labels = torch.as_tensor(labels, dtype=torch.long)
    if w == -1:  # (1 + w) eps(z, c) - w eps(z, null) is eps(z, null) alone: skip the conditional half of the batch
        labels, w = torch.full_like(labels, null_class), 0.0
    batch_size = batch_size or (1024 if device.type == "cuda" else 8)
    out, start = [], 0
    while start < len(labels):
        y = labels[start:start + batch_size].to(device)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, start + len(y))]
        kw = dict(w=w, steps=steps, null_class=null_class, generator=gens, clip_x0=clip_x0,
                  guidance_interval=guidance_interval, w_unguided=w_unguided)
        try:
            x = (ddim_sample(eps_model, schedule, y, (len(y), *size), eta=eta, **kw) if sampler == "ddim" else
                 ancestral_sample(eps_model, schedule, y, (len(y), *size), v=v, **kw))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            continue
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        start += len(y)
        if progress is not None:
            progress(start, len(labels))
    return np.concatenate(out) if out else np.zeros((0, *size[1:], 3), np.uint8)


def sample_checkpoint(model, config, labels, *, seed=0, **kw):
    """sample_images for a checkpoint's (model, config), split over torchrun's ranks: rank r draws its block of the
    labels, image i still from seed + i, and rank 0 returns all the images in order, the other ranks None. The
    schedule, the null class and the unguided scale (the w of w_eff = 0, used outside a guidance interval) come from
    config. A plain run is sample_images on all the labels."""
    part = share(len(labels))
    images = gather_on_main(sample_images(model, Schedule(config["schedule"]), labels[part], seed=seed + part.start,
                                          null_class=config["unet"]["num_classes"],
                                          w_unguided=effective_to_sampling_w(config, 0.0), **kw))
    return None if images is None else np.concatenate(images)


def main(argv=None):
    p = parser("Draw images with classifier-free guidance from a train.py checkpoint.")
    p.add_argument("--ckpt", type=existing_file, required=True, help="checkpoint written by train.py")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--w", type=number(float, lo=-1), default=0.0, help="eps~ = (1+w) eps(z,c) - w eps(z,null); -1 is "
                   "unconditional (>= -1)")
    g.add_argument("--w-eff", type=number(float), help="effective guidance instead (finite; the w it maps to must be >= -1): "
                   "an aligned checkpoint trained at w_t samples at w = w_t + w_eff (1 + w_t), a guidance-free one trained at "
                   "W at w = (w_eff - W) / (1 + W), a standard one at w = w_eff: the losses compare at equal guidance")
    p.add_argument("--steps", type=number(int, lo=1), default=50, help="sampling steps (>= 1)")
    p.add_argument("--sampler", choices=["ddim", "ancestral"], default="ddim", help="DDIM, or Ho & Salimans' Algorithm 2")
    p.add_argument("--eta", type=number(float, 0, 1), default=0.0, help="ddim: 0 is deterministic, 1 adds DDPM's "
                   "posterior noise (in [0, 1])")
    p.add_argument("--v", type=number(float, 0, 1), default=0.3, help="ancestral: variance interpolation, 0 the "
                   "posterior's, 1 the forward process's (in [0, 1]; theirs: 0.3 at 64x64, 0.2 at 128x128)")
    p.add_argument("--guidance-interval", type=interval, metavar="LO,HI", help="guide only where the noise level "
                   "sigma/alpha is in (LO, HI] (0 <= LO < HI; HI may be inf); None: every step")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the predicted clean image to [-1, 1] each step")
    p.add_argument("--n", type=number(int, lo=1), default=100, help="number of images (>= 1)")
    p.add_argument("--classes", default="all", help="'all' or a comma list of ids or names (3,cat), cycled through")
    p.add_argument("--batch-size", type=number(int, lo=1), help="no effect on the images; None: 1024 on CUDA (halved on "
                   "OOM), 8 on CPU")
    p.add_argument("--seed", type=number(int, lo=0), default=0, help="image i is drawn from a generator seeded seed + i")
    p.add_argument("--out", type=output_dir, default="samples", help="directory for grid.png and samples.npz")
    p.add_argument("--grid-per-class", type=number(int, lo=1), default=10, help="images of each class that grid.png "
                   "shows (>= 1); samples.npz and --png-dir hold them all")
    p.add_argument("--png-dir", type=output_dir, help="also write one PNG per image into this directory")
    p.add_argument("--device", type=pick_device, default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--amp", **AMP)
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA weights")
    args = p.parse_args(argv)
    with CleanStop("before any image was drawn: nothing written", quiet=rank_and_world()[0] > 0) as stop:
        run(p, args, stop)  # a signal or a failed write ends it with one line


def run(p, args, stop):
    device, rank = init_distributed(args.device), rank_and_world()[0]  # a plain run: (args.device, 0)
    if rank == 0:  # the one writer under torchrun; it locks first, so that a second run is refused before drawing
        stop.hold(args.out)
    try:
        model, config = load_checkpoint(args.ckpt, device, ema=not args.no_ema)
    except CheckpointError as e:
        p.error(str(e))
    w = args.w if args.w_eff is None else effective_to_sampling_w(config, args.w_eff)
    if w < -1:
        p.error(f"--w-eff gives guidance w = {w:g} < -1 (-1 is unconditional)")
    names = config["class_names"]
    ids = {**{str(i): i for i in range(len(names))}, **{name: i for i, name in enumerate(names)}}
    tokens = list(ids)[:len(names)] if args.classes == "all" else [t.strip() for t in args.classes.split(",")]
    if unknown := [t for t in tokens if t not in ids]:
        p.error(f"argument --classes: unknown class {unknown[0]!r}: use ids 0-{len(names) - 1} or names {','.join(names)}")
    classes = [ids[t] for t in tokens]
    labels = balanced_labels(args.n, classes)
    say = print if rank == 0 else lambda *_: None
    say(speed_line(device, *fast_path(device, args.amp, ch=model.ch)))
    say(f"{args.ckpt}: {config['loss']} loss, {args.n} images at w = {w:g}, {args.steps} {args.sampler} steps on {device}")
    report = progress() if rank == 0 else lambda done, n: None

    def on_batch(done, n):
        stop.finished = f"after {done} of {n} images: nothing written (the images are written once all are drawn)"
        report(done, n)
    images = sample_checkpoint(model, config, labels, w=w, steps=args.steps, eta=args.eta, clip_x0=not args.no_clip,
                               seed=args.seed, batch_size=args.batch_size, device=device, amp=args.amp,
                               sampler=args.sampler, v=args.v, guidance_interval=args.guidance_interval, progress=on_batch)
    if images is None:  # under torchrun rank 0 alone writes
        return
    stop.finished = f"after all {args.n} images, while writing them: no file in {args.out} is half-written"
    grid, npz = os.path.join(args.out, "grid.png"), os.path.join(args.out, "samples.npz")
    nrow = save_class_grid(images, grid, [names[c] for c in classes], args.grid_per_class)
    write_atomic(npz, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    if args.png_dir is not None:
        os.makedirs(args.png_dir, exist_ok=True)
        for i, img in enumerate(images):
            write_atomic(os.path.join(args.png_dir, f"{i:06d}.png"), lambda f: Image.fromarray(img).save(f, "PNG"))
    shown = f"{nrow * len(classes)} of them, {nrow} per class" if nrow * len(classes) < args.n else "all of them"
    print(f"wrote {npz} ({args.n} images) and {grid} ({shown})")


if __name__ == "__main__":
    main()
