"""Train the class-conditional U-Net with the standard or the aligned classifier-free guidance loss.

    python train.py --loss aligned --w 2        # CIFAR-10, downloaded into ./data, run folder runs/aligned-w2

Running the same command again resumes from the run folder's ckpt.pt.
"""
import argparse
import copy
import functools
import hashlib
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request

import numpy as np
import torch
from PIL import Image

from diffusion import Schedule
from losses import aligned_loss, standard_loss
from model import UNet
from sample import autocast, one_line, pick_device, sample_images, save_grid, write_atomic

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SAMPLES_PER_CLASS = 8  # columns per guidance scale in the sample grids
# settings that define the method and the network: a checkpoint that differs in any of them is refused
MUST_MATCH = ("loss", "w", "p_uncond", "detach_uncond", "schedule", "class_names", "unet")

# ---- data ----


def download(url, md5, path):
    """Fetch url to path unless a file with this md5 is there already; a wrong md5 raises and leaves no file."""
    if os.path.exists(path) and file_md5(path) == md5:
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.part"
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        if (got := file_md5(tmp)) != md5:
            raise ValueError(f"{url} has md5 {got}, expected {md5}: download refused")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def extract_tar(archive, dest):
    """Extract archive into dest, refusing it whole if any member is not a plain file or folder inside dest."""
    root = os.path.realpath(dest)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(root, m.name))
            if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
                raise ValueError(f"{archive}: refusing member {m.name!r}, which is not a plain file or folder inside {dest}")
        # the "data" filter (Python >= 3.10.12) repeats these checks and also drops odd permissions
        tar.extractall(root, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def load_cifar10(split="train", data_dir="data", url=CIFAR10_URL, md5=CIFAR10_MD5):
    """CIFAR-10 `split` ("train" or "test") as uint8 images [N, 32, 32, 3], int64 labels [N] and the 10 class names.

    The first call downloads cifar-10-python.tar.gz into data_dir, checks its md5 and extracts it to
    data_dir/cifar-10-batches-py; later calls read that folder. No augmentation.
    """
    if split not in CIFAR10_BATCHES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}: use 'train' or 'test'")
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        archive = download(url, md5, os.path.join(data_dir, "cifar-10-python.tar.gz"))
        tmp = tempfile.mkdtemp(dir=data_dir, prefix=".extract-")
        try:  # extract beside the target and rename, so an interrupted extraction is never mistaken for a complete one
            extract_tar(archive, tmp)
            os.replace(os.path.join(tmp, "cifar-10-batches-py"), folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    images, labels = [], []
    for name in CIFAR10_BATCHES[split]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # Python 2 pickles; the archive's md5 vouches for them
        images.append(batch[b"data"])
        labels.append(batch[b"labels"])
    with open(os.path.join(folder, "batches.meta"), "rb") as f:
        class_names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    images = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes
    return np.ascontiguousarray(images, dtype=np.uint8), np.concatenate(labels).astype(np.int64), class_names


def load_image_folder(root, img_size=32):
    """Images in class sub-folders of root (sorted folder names give the class ids), resized so the short side is
    img_size and centre-cropped to img_size x img_size, as uint8 [N, img_size, img_size, 3], int64 labels, class names."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such folder: {root}")
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    images, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if not file.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(root, name, file)
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except OSError as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
            scale = img_size / min(im.size)
            if scale != 1:
                im = im.resize((max(img_size, round(im.width * scale)), max(img_size, round(im.height * scale))),
                               Image.Resampling.BICUBIC)
            left, top = (im.width - img_size) // 2, (im.height - img_size) // 2
            images.append(np.asarray(im.crop((left, top, left + img_size, top + img_size))))
            labels.append(label)
    if not images:
        raise ValueError(f"{root} holds no images in class sub-folders ({', '.join(IMAGE_EXTENSIONS)})")
    return np.stack(images), np.array(labels, dtype=np.int64), class_names

# ---- command line ----


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [options]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=["standard", "aligned"], default="standard", help="training loss")
    g.add_argument("--w", type=float, default=2.0, help="guidance scale the aligned loss trains for (unused by standard)")
    g.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the label to null (both losses)")
    g.add_argument("--detach-uncond", action="store_true", help="aligned: no gradient through the w eps(z, null) term")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10", help="'cifar10', or a folder of images in class sub-folders")
    g.add_argument("--data-dir", default="data", help="where cifar-10-python.tar.gz is downloaded and extracted")
    g.add_argument("--img-size", type=int, default=32, help="image folders are resized and centre-cropped to this")
    g = p.add_argument_group("model")
    g.add_argument("--ch", type=int, default=128, help="base width (a multiple of 32)")
    g.add_argument("--ch-mult", type=int_list, default=[1, 2, 2, 2], help="width multiplier per level, e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per level")
    g.add_argument("--attn-res", type=int_list, default=[16], help="resolutions with self-attention, e.g. 16 ('' for none)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the residual blocks (both losses)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=100_000, help="total optimizer steps (estimated at about an hour on "
                   "one H100 for standard; aligned costs twice per step)")
    g.add_argument("--batch-size", type=int, default=128, help="images per step")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate after warm-up")
    g.add_argument("--warmup", type=int, default=5000, help="steps of linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step))")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto", help="autocast dtype; auto: bf16 "
                   "on CUDA, none on the CPU")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA (channels_last is used otherwise)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="auto", help="run folder; auto: runs/standard or runs/aligned-w<w>")
    g.add_argument("--save-every", type=int, default=10_000, help="steps between checkpoints (and one at the end)")
    g.add_argument("--sample-every", type=int, default=10_000, help="steps between EMA sample grids (and one at the end)")
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids")
    g.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines (0: every step)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order and the noise")
    g.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    return p


def check_args(p, args):
    """Refuse bad settings with argparse's one-line error and exit status 2."""
    problems = [(args.batch_size < 1, f"--batch-size must be positive, got {args.batch_size}"),
                (args.iters < 0, f"--iters must be >= 0, got {args.iters}"),
                (args.lr <= 0, f"--lr must be positive, got {args.lr}"),
                (args.loss == "aligned" and args.w < 0, f"--w must be >= 0, got {args.w}"),
                (not 0 <= args.p_uncond <= 1, f"--p-uncond must be in [0, 1], got {args.p_uncond}"),
                (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
                (not 0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1), got {args.ema_decay}"),
                (min(args.warmup, args.grad_clip, args.save_every, args.sample_every, args.log_every) < 0,
                 "--warmup, --grad-clip, --save-every, --sample-every and --log-every must be >= 0"),
                (args.sample_steps < 1, f"--sample-steps must be >= 1, got {args.sample_steps}"),
                (args.data == "cifar10" and args.img_size != 32, "CIFAR-10 images are 32x32: leave --img-size at 32")]
    for bad, message in problems:
        if bad:
            p.error(message)

# ---- training ----


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    if amp == "fp16" and device.type != "cuda":
        p.error("--amp fp16 needs CUDA (use bf16 or none on the CPU)")
    channels_last = device.type == "cuda" and not args.no_channels_last
    out = args.out if args.out != "auto" else "runs/standard" if args.loss == "standard" else f"runs/aligned-w{args.w:g}"

    try:
        images, labels, class_names = (load_cifar10("train", args.data_dir) if args.data == "cifar10"
                                       else load_image_folder(args.data, args.img_size))
    except (OSError, ValueError) as e:
        p.error(f"--data {args.data}: {e}")
    if len(images) < args.batch_size:
        p.error(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    config = {k: v for k, v in vars(args).items() if k not in ("ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")}
    config.update(w=args.w if args.loss == "aligned" else None, amp=amp, device=str(device), out=out, class_names=class_names,
                  unet=dict(num_classes=len(class_names), ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                            attn_res=args.attn_res, dropout=args.dropout, img_size=images.shape[1]))
    null_class = len(class_names)

    ckpt_path, ckpt = os.path.join(out, "ckpt.pt"), None
    if os.path.exists(ckpt_path):
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            old, start = dict(ckpt["config"]), int(ckpt["step"])
        except Exception as e:  # torch.load raises many kinds; any of them means the file is unusable
            p.error(f"cannot read checkpoint {ckpt_path}: {one_line(e)}")
        differ = [f"{k} (checkpoint {old.get(k)!r}, flags {config[k]!r})" for k in MUST_MATCH if old.get(k) != config[k]]
        if differ:
            p.error(f"{ckpt_path} was trained with other settings: {'; '.join(differ)}. Use another --out or matching flags")

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
    if ckpt is None:
        start = 0
    else:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            if ckpt.get("scaler"):  # empty unless the run used fp16
                scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            p.error(f"cannot restore {ckpt_path}: {one_line(e)}")
        del ckpt
    os.makedirs(out, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for --amp none
    train_model = torch.compile(model) if args.compile else model  # checkpoints take `model`: no _orig_mod. prefixes
    schedule = Schedule(args.schedule)
    mixed_precision = autocast(device, amp)

    # The data lives as uint8 on the training device when it fits (CIFAR-10: 150 MB), so batches never wait on a loader.
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)
    if device.type == "cuda" and data.nbytes < 0.25 * torch.cuda.mem_get_info(device)[0]:
        data, targets = data.to(device), targets.to(device)
    elif device.type == "cuda":
        data, targets = data.pin_memory(), targets.pin_memory()
    del images, labels
    steps_per_epoch = len(data) // args.batch_size  # the last partial batch of each epoch is dropped

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch):
        # its own generator, seeded by (seed, epoch): a resumed run recomputes the order without storing it
        gen = torch.Generator(data.device).manual_seed(args.seed * 1_000_000 + epoch)
        return torch.randperm(len(data), generator=gen, device=data.device)

    def get_batch(step):
        epoch, i = divmod(step, steps_per_epoch)
        idx = epoch_order(epoch)[i * args.batch_size:(i + 1) * args.batch_size]
        x = data[idx].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC uint8 -> [-1, 1]
        flip = torch.rand(len(x), device=device) < 0.5  # random horizontal flips, from the global (checkpointed) RNG
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), \
            targets[idx].to(device, non_blocking=True)

    def loss_fn(x, y):
        if args.loss == "standard":
            return standard_loss(train_model, schedule, x, y, p_uncond=args.p_uncond, null_class=null_class)
        return aligned_loss(train_model, schedule, x, y, w=args.w, p_uncond=args.p_uncond, null_class=null_class,
                            detach_uncond=args.detach_uncond)

    saved_step = start if os.path.exists(ckpt_path) else None

    def save(step):
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "config": config, "rng": rng}
        write_atomic(ckpt_path, lambda f: torch.save(ckpt, f))

    def sample_grid(step):
        # one row per class: SAMPLES_PER_CLASS images at w = 0, then the same noises at the training w (standard: 2)
        guided = args.w if args.loss == "aligned" else 2.0
        ws = [0.0, guided] if guided else [0.0]
        ys = np.repeat(np.arange(null_class), SAMPLES_PER_CLASS)
        grids = np.stack([sample_images(ema, schedule, ys, null_class=null_class, w=w, steps=args.sample_steps, seed=args.seed,
                                        device=device, amp=amp) for w in ws])  # [len(ws), C * k, H, W, 3]
        grids = grids.reshape(len(ws), null_class, SAMPLES_PER_CLASS, *grids.shape[2:]).transpose(1, 0, 2, 3, 4, 5)
        path = os.path.join(out, f"samples_{step:07d}.png")
        save_grid(grids.reshape(-1, *grids.shape[3:]), path, nrow=len(ws) * SAMPLES_PER_CLASS)
        return path

    pending, window = [], []  # per-step (loss, grad norm) still on the device; the same on the host since the last line

    def check(step):
        """Bring the pending figures to the host (one sync) and stop on a NaN or inf loss."""
        if not pending:
            return
        values = torch.stack(pending).cpu()
        pending.clear()
        bad = (~torch.isfinite(values[:, 0])).nonzero()
        if len(bad):
            first = step - len(values) + 1 + int(bad[0])
            kept = f"{ckpt_path} (step {saved_step}) is kept" if saved_step is not None else "no checkpoint was written"
            sys.exit(f"error: the loss is {values[int(bad[0]), 0].item()} at step {first}; training stopped, {kept}")
        window.append(values)

    if device.type == "cpu":
        print("warning: no CUDA device, training on the CPU: this works but is slow", file=sys.stderr)
    print(f"{args.loss} loss{f' at w={args.w:g}' if args.loss == 'aligned' else ''}: {len(data)} images, {null_class} classes, "
          f"{sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, {device}, amp {amp}, "
          f"steps {start} -> {args.iters}, run folder {out}", file=sys.stderr)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
    model.train()
    t_log = time.time()
    for step in range(start, args.iters):  # `step` optimizer steps are done; this iteration makes step + 1
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(step)
        with mixed_precision:
            loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # EMA with warm-up, so short runs already give a meaningful EMA
            torch._foreach_lerp_(ema_params, params, 1 - min(args.ema_decay, (1 + step) / (10 + step)))
        pending.append(torch.stack([loss.detach(), grad_norm.detach().float()]))
        done = step + 1

        if done == start + 1 or done == args.iters or time.time() - t_log >= args.log_every:
            check(done)
            values = torch.cat(window).mean(0).tolist()
            n, elapsed = sum(len(v) for v in window), time.time() - t_log
            window.clear()
            rate = n / elapsed  # steps/s over training time only: sampling and saving are excluded below
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            record = dict(step=done, loss=values[0], grad_norm=values[1], lr=lr, img_per_s=rate * args.batch_size,
                          eta_s=(args.iters - done) / rate, gpu_mem_gib=mem, time=time.time())
            print(f"step {done}/{args.iters} | loss {values[0]:.4f} | grad {values[1]:.3f} | lr {lr:.2e} | "
                  f"{record['img_per_s']:.0f} img/s | eta {record['eta_s'] / 60:.1f} min | "
                  f"mem {f'{mem:.2f} GiB' if mem is not None else 'n/a'}", file=sys.stderr)
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            t_log = time.time()
        t_pause = time.time()
        if (args.sample_every and done % args.sample_every == 0) or done == args.iters:
            check(done)  # never sample, or save, weights that came from a non-finite loss
            print(f"step {done}: wrote {sample_grid(done)}", file=sys.stderr)
        if (args.save_every and done % args.save_every == 0) or done == args.iters:
            check(done)
            save(done)
            saved_step = done
        t_log += time.time() - t_pause
    if start >= args.iters:
        print(f"{out} is at step {start} and --iters is {args.iters}: nothing to do", file=sys.stderr)


if __name__ == "__main__":
    main()
