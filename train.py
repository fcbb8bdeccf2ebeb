"""Train the class-conditional U-Net with the standard, aligned or guidance-free classifier-free guidance loss.

    python train.py --loss aligned --w 2        # CIFAR-10, downloaded into ./data, run folder runs/aligned-w2

Running the same command again resumes from the run folder's ckpt.pt; torchrun trains on several GPUs (README: "More
than one GPU"). The file reads top to bottom: the flags, the setup (data, configuration, resume), one training step, the
progress figures, saving, and main's loop.
"""
import argparse
import copy
import functools
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from data import load_cifar10, load_image_folder, resize_images
from diffusion import Schedule
from distributed import gather_on_main, init_distributed, main_first, max_over_ranks, mean_over_ranks, rank_and_world, share
from flags import AMP, existing_file, folder_or, number, numbers, output_dir, parser, unit_range
from losses import aligned_loss, guidance_free_loss, standard_loss
from model import UNet
from runtime import CleanStop, Stopped, append_line, autocast, fast_path, one_line, pick_device, save_grid, speed_line, \
    tune_cuda, warn, write_atomic
from sample import sample_images

SAMPLES_PER_CLASS = 8  # columns per guidance scale in the sample grids
# settings that define the method and the network: a checkpoint that differs in any of them is refused
MUST_MATCH = ("loss", "w", "p_uncond", "detach_uncond", "gf_start", "gf_t_range", "schedule", "class_names", "unet")

# ---- command line ----


COUNT, NONNEG = number(int, lo=1), number(int, lo=0)  # counts (>= 1), steps and seeds (>= 0)
FRACTION = number(float, 0, 1, hi_open=True)  # [0, 1): dropout, EMA decay


def out_folder(text):
    """--out: 'auto' (its folder follows --loss and --w, checked in check_args) or a folder that is or can become one."""
    return text if text == "auto" else output_dir(text)


def get_parser():
    p = parser(__doc__.split("\n")[0], usage="%(prog)s [options]")
    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=["standard", "aligned", "guidance-free"], default="standard", help="training loss")
    g.add_argument("--w", type=number(float), default=2.0, help="aligned: the guidance scale it trains for (>= 0); "
                   "guidance-free: the W its plain conditional prediction builds in (> -1); unused by standard")
    g.add_argument("--p-uncond", type=number(float, 0, 1), default=0.1, help="probability of dropping the label to null "
                   "(in [0, 1])")
    g.add_argument("--detach-uncond", action="store_true", help="aligned: no gradient through the w eps(z, null) term")
    g.add_argument("--gf-start", type=NONNEG, default=20_000, help="guidance-free: steps of the standard "
                   "loss before the guidance term starts, so the EMA teacher is a trained model first (>= 0)")
    g.add_argument("--gf-t-range", type=unit_range, default=(0.0, 1.0), metavar="LO,HI", help="guidance-free: the "
                   "diffusion times t that get the guidance term (0 <= LO < HI <= 1)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=folder_or("cifar10", what="a folder of class sub-folders"), default="cifar10",
                   help="'cifar10', or a folder of images in class sub-folders")
    g.add_argument("--data-dir", type=output_dir, default="data", help="where cifar-10-python.tar.gz is downloaded and "
                   "extracted")
    g.add_argument("--img-size", type=COUNT, default=32, help="images are resized (bicubic) and centre-cropped to this "
                   "(>= 1, divisible by 2 per level below the top; CIFAR-10 is 32)")
    g = p.add_argument_group("model")
    g.add_argument("--ch", type=number(int, lo=32, multiple=32), default=128, help="base width (a multiple of 32: "
                   "GroupNorm's 32 groups)")
    g.add_argument("--ch-mult", type=numbers(int, lo=1), default=[1, 2, 2, 2], help="width multiplier per level, "
                   "e.g. 1,2,2,2 (each >= 1)")
    g.add_argument("--num-res-blocks", type=COUNT, default=2, help="residual blocks per level (>= 1)")
    g.add_argument("--attn-res", type=numbers(int, empty_ok=True, lo=1), default=[16], help="resolutions with "
                   "self-attention, e.g. 16 (each >= 1; '' for none)")
    g.add_argument("--dropout", type=FRACTION, default=0.1, help="dropout in the residual blocks (in [0, 1))")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=NONNEG, default=100_000, help="total optimizer steps, >= 0 (estimated at about an hour "
                   "on one H100 for standard; aligned costs twice per step)")
    g.add_argument("--batch-size", type=COUNT, default=128, help="images per step, all processes together (>= 1)")
    g.add_argument("--lr", type=number(float, lo=0, lo_open=True), default=2e-4, help="Adam's lr after warm-up "
                   "(> 0)")
    g.add_argument("--warmup", type=NONNEG, default=5000, help="steps of linear lr warm-up (>= 0)")
    g.add_argument("--grad-clip", type=number(float, lo=0), default=1.0, help="clip the gradient norm to this (>= 0; "
                   "0: no clipping)")
    g.add_argument("--ema-decay", type=FRACTION, default=0.9999, help="EMA decay in [0, 1), warmed up as"
                   " min(decay, (1+step)/(10+step))")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", **AMP)
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW (channels_last goes with bf16 and fp16; "
                   "fp32 is NCHW)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=out_folder, default="auto", help="run folder; auto: runs/standard, runs/aligned-w<w> or "
                   "runs/guidance-free-w<w>")
    g.add_argument("--save-every", type=NONNEG, default=10_000, help="steps between checkpoints, and one at the end "
                   "(>= 0; 0: only at the end)")
    g.add_argument("--keep-every", type=NONNEG, default=0, help="also keep the checkpoint of every K-th step as "
                   "ckpt-<step>.pt, for learning curves (>= 0; 0: none)")
    g.add_argument("--sample-every", type=NONNEG, default=10_000, help="steps between EMA sample grids, and one at the "
                   "end (>= 0; 0: only at the end)")
    g.add_argument("--sample-steps", type=COUNT, default=50, help="DDIM steps for the sample grids (>= 1)")
    g.add_argument("--log-every", type=number(float, lo=0), default=5.0, help="seconds between progress lines (>= 0; "
                   "0: every step)")
    g.add_argument("--init-from", type=existing_file, metavar="CKPT", help="fine-tuning: a new run starts from this "
                   "checkpoint's weights and EMA, with a fresh optimizer and step count, in any loss (the same network)")
    g.add_argument("--seed", type=NONNEG, default=0, help="seed of the initialisation, the data order and the noise (>= 0)")
    g.add_argument("--device", type=pick_device, default="auto",
                   help="auto (cuda when there is one), cpu, cuda, cuda:N")
    return p


def check_args(p, args):
    """The checks that involve more than one flag (each flag alone is checked by its type), with argparse's one-line
    error and exit status 2. Resolves --out auto to its run folder."""
    world = rank_and_world()[1]  # torchrun's number of processes, known before any process group starts
    if args.out == "auto":
        args.out = "runs/standard" if args.loss == "standard" else f"runs/{args.loss}-w{args.w:g}"
        try:
            output_dir(args.out)
        except argparse.ArgumentTypeError as e:
            p.error(f"--out auto: {e}")
    problems = [(args.batch_size % world, f"--batch-size {args.batch_size} is not divisible by the {world} processes"),
                (args.loss == "aligned" and args.w < 0, f"--w must be >= 0 for the aligned loss, got {args.w:g}"),
                (args.loss == "guidance-free" and not args.w > -1, f"--w {args.w:g} gives u = W / (1 + W) >= 1: the "
                 "guidance-free loss then has no fixed point; use W > -1")]
    for bad, message in problems:
        if bad:
            p.error(message)
    try:  # the network's own checks of its widths, levels and attention resolutions, on the meta device (no memory)
        with torch.device("meta"):
            UNet(num_classes=1, ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                 attn_res=args.attn_res, dropout=args.dropout, img_size=args.img_size)
    except ValueError as e:
        p.error(f"--ch, --ch-mult, --attn-res, --img-size: {e}")

# ---- setup ----


def load_data(p, args):
    """(uint8 images [N, H, W, 3], int64 labels, class names) of --data, or argparse's one-line error."""
    try:
        if args.data == "cifar10":
            images, labels, class_names = load_cifar10("train", args.data_dir)
            images = resize_images(images, args.img_size)
        else:
            images, labels, class_names = load_image_folder(args.data, args.img_size)
    except (OSError, ValueError) as e:
        p.error(f"--data {args.data}: {e}")
    if len(images) < args.batch_size:
        p.error(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    return images, labels, class_names


def make_config(args, device, amp, out, class_names, img_size):
    """Everything a checkpoint needs to be understood alone: the flags, the class names and the network's arguments."""
    config = {k: v for k, v in vars(args).items() if k not in ("ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")}
    free = args.loss == "guidance-free"  # settings of one loss are None for the others, as in older checkpoints
    config.update(w=None if args.loss == "standard" else args.w, gf_start=args.gf_start if free else None,
                  gf_t_range=list(args.gf_t_range) if free else None, amp=amp, device=str(device), out=out, class_names=class_names,
                  unet=dict(num_classes=len(class_names), ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                            attn_res=args.attn_res, dropout=args.dropout, img_size=img_size))
    return config


def read_checkpoint(p, path):
    """(checkpoint, its config), or argparse's one-line error naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return ckpt, dict(ckpt["config"])
    except Exception as e:  # torch.load raises many kinds; any of them means the file is unusable
        p.error(f"cannot read checkpoint {path}: {one_line(e)}")


def resume(p, path, config, model, ema, opt, scaler, device, init_from=None):
    """Restore the run folder's checkpoint (weights, optimizer, loss scaler, this rank's RNG) and return its step; the
    optimizer keeps this run's settings (fused on CUDA) and its state takes each parameter's device, dtype and memory
    format. A checkpoint trained with other settings (MUST_MATCH) is refused, naming each difference. With none, step 0,
    from init_from's weights and EMA if given (fine-tuning: optimizer, RNG and loss are this run's), refused in one line
    if its network or classes differ (dropout may)."""
    if not os.path.exists(path):
        if init_from:
            ckpt, old = read_checkpoint(p, init_from)
            ours = {**config["unet"], "classes": config["class_names"]}
            theirs = {**old.get("unet", {}), "classes": old.get("class_names")}
            if differ := [f"{k} (checkpoint {theirs.get(k)!r}, flags {v!r})" for k, v in ours.items()
                          if k != "dropout" and theirs.get(k) != v]:
                p.error(f"--init-from {init_from}: another network: {'; '.join(differ)}")
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
        return 0
    ckpt, old = read_checkpoint(p, path)
    differ = [f"{k} (checkpoint {old.get(k)!r}, flags {config[k]!r})" for k in MUST_MATCH if old.get(k) != config[k]]
    if differ:
        p.error(f"{path} was trained with other settings: {'; '.join(differ)}. Use another --out or matching flags")
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        saved = ckpt["opt"]  # this run's fused: GradScaler hands fp16's found_inf to any Adam built fused, which must stay so
        opt.load_state_dict({**saved, "param_groups": [{**s, "fused": g["fused"], "foreach": g["foreach"]}
                                                       for s, g in zip(saved["param_groups"], opt.param_groups)]})
        for param, state in opt.state.items():  # load_state_dict's .to() keeps the saved strides: fused Adam misreads them
            state.update({k: torch.empty_like(param).copy_(v) for k, v in state.items() if k != "step"})
        if ckpt.get("scaler"):  # empty unless the run used fp16
            scaler.load_state_dict(ckpt["scaler"])
        rank, states = rank_and_world()[0], ckpt.get("rng_ranks") or [ckpt["rng"]]  # rng_ranks: from torchrun runs
        if rank < len(states):  # a rank the checkpoint has no state for keeps its fresh seed
            torch.set_rng_state(states[rank]["cpu"])
            if device.type == "cuda" and "cuda" in states[rank]:
                torch.cuda.set_rng_state(states[rank]["cuda"], device)
        return int(ckpt["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        p.error(f"cannot restore {path}: {one_line(e)}")


def batches(images, labels, batch_size, seed, device, channels_last):
    """get_batch(step): the step's images in [-1, 1], randomly flipped, and labels, on device.

    The data lives as uint8 on the training device when it fits in a quarter of the free GPU memory of every rank
    (CIFAR-10: 150 MB), so batches never wait on a loader; else on the CPU, unpinned, as the batches it copies are.
    The epoch order is drawn on the CPU by its own generator seeded by (seed, epoch), so it is the same wherever the
    data lives (a CUDA generator draws another): a resumed run recomputes it, and torchrun's ranks share it.
    """
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)
    room = device.type == "cuda" and data.nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]
    if device.type == "cuda" and not max_over_ranks(int(not room), device):  # the ranks place it alike: none waits on copies
        data, targets = data.to(device), targets.to(device)
    steps_per_epoch = len(data) // batch_size  # the last partial batch of each epoch is dropped
    epoch_order = functools.lru_cache(maxsize=1)(lambda epoch: torch.randperm(
        len(data), generator=torch.Generator().manual_seed(seed * 1_000_000 + epoch)).to(data.device))

    def get_batch(step):
        epoch, i = divmod(step, steps_per_epoch)
        idx = epoch_order(epoch)[i * batch_size:(i + 1) * batch_size][share(batch_size)]  # under torchrun: this rank's part
        x = data[idx].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC uint8 -> [-1, 1]
        flip = torch.rand(len(x), device=device) < 0.5  # random horizontal flips, from the rank's (checkpointed) RNG
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), \
            targets[idx].to(device, non_blocking=True)
    return get_batch

# ---- one training step ----


def train_step(args, net, ema, schedule, null_class, x, y, opt, scaler, params, ema_params, step, amp):
    """Optimizer step number step + 1 on batch (x, y): warm-up lr, loss, backward, clipping, Adam, then the EMA
    with warm-up min(decay, (1 + step) / (10 + step)), so short runs already give a meaningful EMA.
    Returns the learning rate and the [loss, grad norm] pair, still on the device (no sync)."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(x.device, amp):
        if args.loss == "standard":
            loss = standard_loss(net, schedule, x, y, p_uncond=args.p_uncond, null_class=null_class)
        elif args.loss == "aligned":
            loss = aligned_loss(net, schedule, x, y, w=args.w, p_uncond=args.p_uncond, null_class=null_class,
                                detach_uncond=args.detach_uncond)
        else:  # the EMA weights are the teacher (see losses.py)
            loss = guidance_free_loss(net, ema, schedule, x, y, w=args.w, p_uncond=args.p_uncond, null_class=null_class,
                                      guide=step >= args.gf_start, t_range=args.gf_t_range)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - min(args.ema_decay, (1 + step) / (10 + step)))
    return lr, torch.stack([loss.detach(), grad_norm.detach().float()])

# ---- progress figures ----


class Figures:
    """The per-step [loss, grad norm] pairs, kept on the device until a progress line or a save needs them."""

    def __init__(self, ckpt_path, saved_step):
        self.pending, self.window, self.ckpt_path, self.saved_step = [], [], ckpt_path, saved_step

    def check(self, step):
        """Bring the pending figures, averaged over ranks, to the host (one sync) and stop on a NaN or inf loss."""
        if not self.pending:
            return
        values = mean_over_ranks(torch.stack(self.pending)).cpu()
        self.pending.clear()
        bad = (~torch.isfinite(values[:, 0])).nonzero()
        if len(bad):
            first = step - len(values) + 1 + int(bad[0])
            sys.exit(f"error: the loss is {values[int(bad[0]), 0].item()} at step {first}; training stopped, {self.kept()}")
        self.window.append(values)

    def kept(self):
        return (f"{self.ckpt_path} (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint was written")

    def log(self, done, iters, lr, batch_size, elapsed, device, out):
        """One progress line on stderr and a record in out/log.jsonl (rank 0), averaged since the last; returns steps/s."""
        self.check(done)
        values, n = torch.cat(self.window).mean(0).tolist(), sum(len(v) for v in self.window)
        self.window.clear()
        rate = n / mean_over_ranks(torch.tensor(elapsed, dtype=torch.float64, device=device)).item()  # steps/s: training only
        if rank_and_world()[0] > 0:
            return rate
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        record = dict(step=done, loss=values[0], grad_norm=values[1], lr=lr, img_per_s=rate * batch_size,
                      eta_s=(iters - done) / rate, gpu_mem_gib=mem, time=time.time())
        print(f"step {done}/{iters} | loss {values[0]:.4f} | grad {values[1]:.3f} | lr {lr:.2e} | "
              f"{record['img_per_s']:.0f} img/s | eta {record['eta_s'] / 60:.1f} min | "
              f"mem {f'{mem:.2f} GiB' if mem is not None else 'n/a'}", file=sys.stderr)
        append_line(os.path.join(out, "log.jsonl"), json.dumps(record))
        return rate

# ---- saving ----


def save_checkpoint(path, model, ema, opt, scaler, step, config, device):
    """Rank 0 writes ckpt.pt; under torchrun, with every rank's RNG state, once all ranks hold bitwise equal weights."""
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    world, digest = rank_and_world()[1], hashlib.sha256()
    for t in [*model.state_dict().values(), *ema.state_dict().values()] if world > 1 else []:
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    if (ranks := gather_on_main((rng, digest.hexdigest()))) is None:  # [(rng, digest)] of every rank, on rank 0
        return
    if len({d for _, d in ranks}) > 1:  # DDP's averaged gradients keep the weights and EMA of all ranks identical
        sys.exit(f"error: at step {step} the {world} ranks hold different weights or EMA; {path} not written")
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": config, "rng": rng, **({"rng_ranks": [r for r, _ in ranks]} if world > 1 else {})}
    write_atomic(path, lambda f: torch.save(ckpt, f))
    if world > 1:
        print(f"step {step}: the {world} ranks hold bitwise equal weights and EMA; wrote {path}", file=sys.stderr)


def sample_grid(ema, schedule, args, class_names, device, amp, channels_last, path):
    """One row per class, named: SAMPLES_PER_CLASS EMA images at w = 0, then the same noises at the training w (standard:
    2); guidance-free: first unguided (w_eff = 0, at w = -W / (1 + W)), then at w = 0, its own guidance W."""
    ws = {"standard": [0.0, 2.0], "aligned": [0.0, args.w], "guidance-free": [-args.w / (1 + args.w), 0.0]}[args.loss]
    ws, null_class = list(dict.fromkeys(ws)), len(class_names)  # one column when the ws coincide (aligned, gf at w = 0)
    ys = np.repeat(np.arange(null_class), SAMPLES_PER_CLASS)
    grids = np.stack([sample_images(ema, schedule, ys, null_class=null_class, w=w, steps=args.sample_steps, seed=args.seed,
                                    device=device, amp=amp, channels_last=channels_last) for w in ws])  # [len(ws), C * k, H, W, 3]
    grids = grids.reshape(len(ws), null_class, SAMPLES_PER_CLASS, *grids.shape[2:]).transpose(1, 0, 2, 3, 4, 5)
    save_grid(grids.reshape(-1, *grids.shape[3:]), path, len(ws) * SAMPLES_PER_CLASS, class_names)
    return path

# ---- main: setup, then the loop ----


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    with CleanStop("before the first step: nothing written", quiet=rank_and_world()[0] > 0) as stop:
        run(p, args, stop)  # a signal or a failed write ends it with one line


def run(p, args, stop):
    device, (rank, world) = init_distributed(args.device), rank_and_world()  # a plain run: (args.device, (0, 1))
    amp, channels_last, why = fast_path(device, args.amp, not args.no_channels_last, args.ch)
    out = args.out
    if rank == 0:  # the one writer under torchrun; it locks before resume reads ckpt.pt, which another run may replace
        stop.hold(out)
    with main_first():  # under torchrun rank 0 downloads CIFAR-10 before the other ranks read it
        images, labels, class_names = load_data(p, args)
    config = make_config(args, device, amp, out, class_names, images.shape[1])
    null_class, ckpt_path = len(class_names), os.path.join(out, "ckpt.pt")

    torch.manual_seed(args.seed)
    try:
        model = UNet(**config["unet"]).to(device)
    except ValueError as e:
        p.error(str(e))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if world > 1:  # every rank has the same initial weights; then each draws its own noise, labels dropped and flips
        torch.manual_seed(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))
    start = resume(p, ckpt_path, config, model, ema, opt, scaler, device, args.init_from)  # once started: its own
    tune_cuda(device, amp)
    net = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(net) if args.compile else net  # checkpoints take `model`: no _orig_mod. or module. prefixes
    schedule = Schedule(args.schedule)
    get_batch = batches(images, labels, args.batch_size, args.seed, device, channels_last)
    figures = Figures(ckpt_path, start if os.path.exists(ckpt_path) else None)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    if rank == 0:  # under torchrun only rank 0 prints and writes files
        print(speed_line(device, amp, channels_last, why), file=sys.stderr)
        if device.type == "cpu":
            warn("no CUDA device, training on the CPU: this works but is slow")
        print(f"{args.loss} loss{f' at w={args.w:g}' if args.loss != 'standard' else ''}: {len(images)} images, "
              f"{null_class} classes, {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, {device}"
              f"{f' x {world}' * (world > 1)}, amp {amp}, steps {start} -> {args.iters}"
              f"{f' from the weights of {args.init_from}' * bool(args.init_from and not start)}, run folder {out}", file=sys.stderr)
    del images, labels

    model.train()
    t_log, next_log, stop.defer = time.time(), 0, True  # a signal now ends the loop after its step, with a checkpoint
    for step in range(start, args.iters):  # `step` optimizer steps are done; this iteration makes step + 1
        x, y = get_batch(step)
        lr, figure = train_step(args, net, ema, schedule, null_class, x, y, opt, scaler, params, ema_params, step, amp)
        figures.pending.append(figure)
        done = step + 1
        log_due = done in (start + 1, args.iters) or (done >= next_log if world > 1 else time.time() - t_log >= args.log_every)
        # torchrun: a signal reaches the ranks at different steps; they agree at a log step, which syncs them anyway
        stopping = max_over_ranks(stop.signum or 0, device) if log_due or world == 1 else 0
        if log_due or stopping:
            rate = figures.log(done, args.iters, lr, args.batch_size, time.time() - t_log, device, out)
            next_log, t_log = done + max(1, int(args.log_every * rate)), time.time()  # torchrun: a step all ranks agree on
        t_pause = time.time()
        if (args.sample_every and done % args.sample_every == 0) or done == args.iters:
            figures.check(done)  # never sample, or save, weights that came from a non-finite loss
            if rank == 0:  # the EMA module alone, no collective inside: the other ranks wait in the next one
                path = sample_grid(ema, schedule, args, class_names, device, amp, channels_last,
                                   os.path.join(out, f"samples_{done:07d}.png"))
                print(f"step {done}: wrote {path}", file=sys.stderr)
        keep = args.keep_every and done % args.keep_every == 0
        if (args.save_every and done % args.save_every == 0) or keep or done == args.iters or stopping:
            figures.check(done)
            stop.finished, stop.defer = f"while saving step {done}: {figures.kept()}", rank > 0 or not stopping
            save_checkpoint(ckpt_path, model, ema, opt, scaler, done, config, device)  # a second signal abandons it
            if keep:
                save_checkpoint(os.path.join(out, f"ckpt-{done:07d}.pt"), model, ema, opt, scaler, done, config, device)
            figures.saved_step, stop.defer = done, True
        if stopping:
            stop.finished = f"at step {done}: checkpoint saved, run the same command to resume"
            raise Stopped(stopping)
        t_log += time.time() - t_pause
    if start >= args.iters and rank == 0:
        print(f"{out} is at step {start} and --iters is {args.iters}: nothing to do", file=sys.stderr)


if __name__ == "__main__":
    main()
