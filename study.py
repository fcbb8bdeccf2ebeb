"""The study of RESULTS.md: the three losses trained on CIFAR-10 and compared, in resumable stages, at a preset's scale.

    python study.py --data DIR/train --test DIR/test   # RESULTS.md's CPU study, every stage in order (4 h on 2 cores)
    python study.py --preset gpu --nproc 8             # the paper's scale, 32 x 32 and 50,000 samples a cell (README)
    python study.py --list                             # the stages' command lines and predicted times, without running
    python study.py --report                           # the tables and figures, from the finished stages

Each stage is one command line of train.py, sweep.py or fid.py, run as a child process; a stage that finished is
recorded in <out>/stages.tsv with its wall time and never run again, and one that was stopped resumes where it was
(train.py from its checkpoint, sweep.py from its finished cells), so the study can be run in several sittings. Before
its first stage it prints the plan: each stage's predicted time on this device, from a few seconds' measurement.
"""
import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from bench import time_fid, time_sampling, time_training
from flags import number, output_dir, parser
from model import UNet
from runtime import fast_path, lock_folder, pick_device, tune_cuda, warn, write_atomic
from sweep import plot, pyplot, read_results, run_name
from train import get_parser as train_parser

# A preset: train.py's flags that every run shares, the training steps N, the images of each sweep cell and of the
# reference, the DDIM steps and w_eff grid of the final sweeps, the extra training seeds, and the stages that run
# (None: all). The evaluation's other choices follow from n: the real test images min(n, 10,000) (CIFAR-10 has
# 10,000), KID's subsets half the images and at most torch-fidelity's 1,000, the sample-seed floor from seed n on.
PRESETS = {
    # RESULTS.md's CPU study: the 1.07M-parameter U-Net at 16 x 16 (RESULTS.md says why)
    "cpu": dict(train={"--img-size": "16", "--ch": "32", "--ch-mult": "1,2,2", "--num-res-blocks": "1",
                       "--attn-res": "", "--dropout": "0", "--batch-size": "64", "--lr": "5e-4", "--warmup": "100",
                       "--ema-decay": "0.995", "--seed": "0", "--amp": "none", "--sample-every": "0",
                       "--sample-steps": "25"},
                iters=1600, n=1000, ref_n=2000, steps=25, w_eff="0,0.5,1,2,3", seeds=(), stages=None),
    # the paper's scale: DDPM's 35.75M U-Net and optimiser at 32 x 32, 50,000 samples against the whole training set
    # (README, "The comparison at the paper's scale, on GPUs", says which choices are published and which are ours)
    "gpu": dict(train={"--img-size": "32", "--ch": "128", "--ch-mult": "1,2,2,2", "--num-res-blocks": "2",
                       "--attn-res": "16", "--dropout": "0.1", "--batch-size": "128", "--lr": "2e-4",
                       "--warmup": "5000", "--ema-decay": "0.9999", "--seed": "0", "--amp": "auto",
                       "--sample-every": "10000", "--sample-steps": "50"},
                iters=200_000, n=50_000, ref_n=50_000, steps=50, w_eff="0,0.25,0.5,1,2,3", seeds=("1", "2"),
                stages=None),
    # every kind of stage (fid.py, train.py, sweep.py, a copy, the report) on a few 8 x 8 images in seconds: the tests'
    "tiny": dict(train={"--img-size": "8", "--ch": "32", "--ch-mult": "1,2", "--num-res-blocks": "1", "--attn-res": "",
                        "--dropout": "0", "--batch-size": "4", "--lr": "5e-4", "--warmup": "0", "--ema-decay": "0.9",
                        "--seed": "0", "--amp": "none", "--sample-every": "0", "--sample-steps": "1"},
                 iters=4, n=6, ref_n=6, steps=2, w_eff="0,1", seeds=(),
                 stages=("ref", "train_standard", "final_standard", "copy_standard", "train_standard_2x")),
}
MODELS = ["standard", "aligned-w2", "guidance-free", "standard-2x"]
DAY = 24 * 3600  # a plan longer than this on this device starts only with --yes


def standard_best_w(a):
    """The standard model's best w_eff > 0 by FID in the final sweep (the guidance-free model's W), or None."""
    rows = [r for r in read_results(os.path.join(a.out, "final", "results.csv"))
            if run_name(r["checkpoint"]) == "standard" and float(r["w_eff"]) > 0]
    grid = [w for w in PRESETS[a.preset]["w_eff"].split(",") if float(w) > 0]
    return f"{float(min(rows, key=lambda r: float(r['fid']))['w_eff']):g}" if len(rows) == len(grid) else None


def flag_words(flags):
    """{"--lr": "1e-4", "--detach-uncond": True} as command-line words: --lr 1e-4 --detach-uncond."""
    return [x for k, v in flags.items() for x in (k, v)[:1 + (v is not True)]]


def launcher(a):
    """What runs a train.py or sweep.py stage on --nproc processes: torchrun (nothing for one)."""
    return ["torchrun", "--standalone", "--nproc_per_node", str(a.nproc), "--"] if a.nproc > 1 else []


def train(a, out, loss, iters=None, **flags):
    """A train.py command line with the preset's flags, N steps unless iters; flags as w="2", detach_uncond=True."""
    keep = str(a.iters // 4)
    flags = {**PRESETS[a.preset]["train"], "--save-every": keep, "--keep-every": keep,
             **{f"--{k.replace('_', '-')}": v for k, v in flags.items()}}
    return [*launcher(a), "train.py", "--data", a.data, "--loss", loss, *flag_words(flags),
            "--iters", str(iters or a.iters), "--out", f"{a.out}/{out}"]


def sweep(a, out, runs, *extra):
    """A sweep.py command line over runs, each a run folder's ckpt.pt or, as <run>@<step>, its kept ckpt-<step>.pt."""
    ckpts = [f"{a.out}/{r}/ckpt.pt" if not step else f"{a.out}/{r}/ckpt-{int(step):07d}.pt"
             for r, _, step in (r.partition("@") for r in runs)]
    return [*launcher(a), "sweep.py", "--ckpt", *ckpts, "--n", str(a.n), "--ref", reference(a), "--kid", "--prdc",
            "--kid-subset-size", str(min(a.n // 2, 1000)), "--amp", PRESETS[a.preset]["train"]["--amp"],
            "--out", f"{a.out}/{out}", *(extra or ["--w-eff", "0,1", "--steps", "10"])]


def reference(a):
    """The statistics and features of the preset's training images, which every sweep cell is scored against."""
    return f"{a.out}/ref_train{PRESETS[a.preset]['ref_n']}.npz"


def stages(a, W):
    """(name, command line) of every stage, in order; W is the guidance-free model's W ('W' until it is known)."""
    S, N, P = a.out, a.iters, PRESETS[a.preset]
    real = lambda split: f"cifar10-{split}" if a.data == "cifar10" else a.data if split == "train" else a.test
    size, ref, steps, real_n = P["train"]["--img-size"], reference(a), str(P["steps"]), min(a.n, 10_000)
    final = ["--w-eff", P["w_eff"], "--steps", steps]
    three = ["standard", "aligned-w2", "guidance-free"]
    at = lambda step: [f"{r}@{step}" for r in three]
    # the ablation flips the dropout of the main runs: 0.1 where they have none, none where they have DDPM's 0.1
    dropout = "0.1" if P["train"]["--dropout"] == "0" else "0"
    plan = [
        ("ref", ["fid.py", real("train"), "--img-size", size, "--n", str(P["ref_n"]), "--save-stats", ref,
                 "--with-features"]),
        ("realvsreal", ["fid.py", real("test"), ref, "--img-size", size, "--n", str(real_n), "--kid", "--prdc",
                        "--kid-subset-size", str(min(real_n // 2, 1000))]),
        ("train_standard", train(a, "standard", "standard")),
        ("final_standard", sweep(a, "final", ["standard"], *final)),
        ("train_aligned", train(a, "aligned-w2", "aligned", w="2")),
        ("final_aligned", sweep(a, "final", ["aligned-w2"], *final)),
        ("train_gf", train(a, "guidance-free", "guidance-free", w=W, gf_start=str(N // 2))),
        ("final_gf", sweep(a, "final", ["guidance-free"], *final)),
        ("seed_floor", sweep(a, f"seed{a.n}", ["standard", "aligned-w2"], "--w-eff", "1", "--steps", steps,
                             "--seed", str(a.n))),
        # equal compute: an aligned step is two network evaluations with gradient per image, two standard steps
        ("copy_standard", ["cp", f"{S}/standard/ckpt-{N:07d}.pt", f"{S}/standard-2x/ckpt.pt"]),
        ("train_standard_2x", train(a, "standard-2x", "standard", 2 * N)),
        ("equal_compute", sweep(a, "final", ["standard-2x"], "--w-eff", f"0,1,{W}", "--steps", steps)),
        ("equal_w", sweep(a, "equal_w", ["aligned-w2"], "--w", "0,1,3", "--steps", steps)),
        ("steps10", sweep(a, "steps10", three, "--w-eff", "0,1", "--steps", "10")),
        # learning curves at 10 DDIM steps, a fraction of the final sweeps' cost (Inception's pass over each cell
        # stays): the steps10 stage holds their last point, step N
        (f"curves_{N // 2}", sweep(a, "curves", at(N // 2))),
        ("train_ablation_std", train(a, f"standard-dropout{dropout}", "standard", N // 2, dropout=dropout)),
        ("train_ablation_aligned", train(a, f"aligned-w2-dropout{dropout}", "aligned", N // 2, w="2", dropout=dropout)),
        ("train_ablation_lr", train(a, "aligned-w2-lr1e-4", "aligned", N // 2, w="2", lr="1e-4")),
        ("ablation", sweep(a, "ablation", [f"standard-dropout{dropout}", f"aligned-w2-dropout{dropout}",
                                           "aligned-w2-lr1e-4"], "--w-eff", "1", "--steps", "10")),
        (f"curves_{N // 4}", sweep(a, "curves", at(N // 4))),
        (f"curves_{3 * N // 4}", sweep(a, "curves", at(3 * N // 4))),
    ]
    for seed in P["seeds"]:  # the training-seed floor: the initial weights, the data order and every draw of noise
        plan += [(f"train_standard_seed{seed}", train(a, f"standard-seed{seed}", "standard", seed=seed)),
                 (f"train_aligned_seed{seed}", train(a, f"aligned-w2-seed{seed}", "aligned", w="2", seed=seed))]
    if P["seeds"]:
        plan.append(("seeds", sweep(a, "seeds", [f"{m}-seed{s}" for s in P["seeds"] for m in MODELS[:2]], *final)))
    return plan


def second_round(a, W="W"):
    """The second round's stages (RESULTS.md, "Second round"), in the order that leaves the most useful part done at a
    stop: training seeds, the gradient into eps(z, null), fine-tuning, the dose-response in w_t, four times the
    training. It begins with the first round's stages it builds on, under their names, so each runs once for both."""
    S, N, first = a.out, a.iters, dict(stages(a, W))
    steps = str(PRESETS[a.preset]["steps"])
    cells = lambda *runs: sweep(a, "round2", runs, "--w-eff", "0,1,3", "--steps", steps)
    half = f"{S}/standard/ckpt-{N // 2:07d}.pt"  # fine-tuning starts from the standard model at N/2

    def continued(tag, base, run, loss, iters, **flags):
        """Two stages: copy base's last checkpoint into run's folder, then train run on from it to iters steps, so
        that base keeps its own checkpoint and cells."""
        return [(f"r2_copy_{tag}", ["cp", f"{S}/{base}/ckpt.pt", f"{S}/{run}/ckpt.pt"]),
                (f"r2_train_{tag}", train(a, run, loss, iters, **flags))]

    plan = [(name, first[name]) for name in ("ref", "train_standard", "train_aligned")]
    plan.append(("r2_seed0", cells("standard", "aligned-w2")))
    for seed in ("1", "2"):  # a seed is the initial weights, the data order and every draw of noise and dropout
        plan += [(f"r2_train_standard_seed{seed}", train(a, f"standard-seed{seed}", "standard", seed=seed)),
                 (f"r2_train_aligned_seed{seed}", train(a, f"aligned-w2-seed{seed}", "aligned", w="2", seed=seed)),
                 (f"r2_seed{seed}", cells(f"standard-seed{seed}", f"aligned-w2-seed{seed}"))]
    plan += [
        ("r2_train_detach", train(a, "aligned-w2-detach", "aligned", w="2", detach_uncond=True)),
        ("r2_detach", cells("aligned-w2-detach")),
        # N/2 aligned steps cost about N standard ones: the equal-compute partner is standard continued to 3N/2
        ("r2_train_ft_aligned", train(a, "ft-aligned-w2", "aligned", N // 2, w="2", init_from=half)),
        ("r2_train_ft_detach", train(a, "ft-aligned-w2-detach", "aligned", N // 2, w="2", detach_uncond=True,
                                     init_from=half)),
        ("r2_train_ft_standard", train(a, "ft-standard", "standard", N // 2, init_from=half)),
        ("copy_standard", first["copy_standard"]), ("train_standard_2x", first["train_standard_2x"]),
        ("r2_ft", cells("ft-aligned-w2", "ft-aligned-w2-detach", "ft-standard", f"standard-2x@{3 * N // 2}"))]
    for w_t in ("0.5", "1", "4"):
        plan += [(f"r2_train_aligned_w{w_t}", train(a, f"aligned-w{w_t}", "aligned", w=w_t)),
                 (f"r2_wt{w_t}", cells(f"aligned-w{w_t}"))]
    plan += [*continued("standard_4x", "standard-2x", "standard-4x", "standard", 4 * N),
             *continued("aligned_4x", "aligned-w2", "aligned-w2-4x", "aligned", 4 * N, w="2"),
             ("r2_long", sweep(a, "round2", ["standard-2x", "standard-4x", f"aligned-w2-4x@{2 * N}", "aligned-w2-4x"],
                               "--w-eff", "0,1", "--steps", steps))]
    # the conditional stages, added once the stages above were read (RESULTS.md, "Second round"): --detach-uncond at
    # the two seeds where plain aligned trails (seed 0 is the one where it does not), the equal-compute partner of
    # aligned at 4N (standard at 8N, since aligned at 4N is within the seed spread at w_eff 1), and fine-tuning at
    # seeds 1 and 2 (the one place at seed 0 where an aligned variant led: w_eff 3)
    for seed in ("1", "2"):
        plan.append((f"r2_train_detach_seed{seed}", train(a, f"aligned-w2-detach-seed{seed}", "aligned", w="2",
                                                          detach_uncond=True, seed=seed)))
    plan += [("r2_detach_seeds", cells("aligned-w2-detach-seed1", "aligned-w2-detach-seed2")),
             *continued("standard_8x", "standard-4x", "standard-8x", "standard", 8 * N),
             ("r2_long_8x", sweep(a, "round2", ["standard-8x"], "--w-eff", "0,1", "--steps", steps))]
    for seed in ("1", "2"):
        half = f"{S}/standard-seed{seed}/ckpt-{N // 2:07d}.pt"
        plan += [(f"r2_train_ft_aligned_seed{seed}", train(a, f"ft-aligned-w2-seed{seed}", "aligned", N // 2, w="2",
                                                           init_from=half, seed=seed)),
                 (f"r2_train_ft_standard_seed{seed}", train(a, f"ft-standard-seed{seed}", "standard", N // 2,
                                                            init_from=half, seed=seed))]
    plan.append(("r2_ft_seeds", cells(*(f"ft-{m}-seed{s}" for s in ("1", "2") for m in ("aligned-w2", "standard")))))
    # read after the stages above: fine-tuning leads at w_eff 3 in every seed, so its equal-compute partner (standard
    # at 3N/2) at seeds 1 and 2; --detach-uncond beats plain aligned in every paired cell, so it is the aligned run
    # continued to 4N as well (its equal-compute partner, standard at 8N, has run)
    for seed in ("1", "2"):
        plan += continued(f"standard_1.5x_seed{seed}", f"standard-seed{seed}", f"standard-1.5x-seed{seed}",
                          "standard", 3 * N // 2, seed=seed)
    plan += [("r2_ft_equal_compute", cells("standard-1.5x-seed1", "standard-1.5x-seed2")),
             *continued("detach_4x", "aligned-w2-detach", "aligned-w2-detach-4x", "aligned", 4 * N, w="2",
                        detach_uncond=True),
             ("r2_long_detach", sweep(a, "round2", [f"aligned-w2-detach-4x@{2 * N}", "aligned-w2-detach-4x"],
                                      "--w-eff", "0,1", "--steps", steps))]
    # fine-tuning changed the verdict at w_eff 3 beyond the seed spread, so its detached variant at seeds 1 and 2 too
    for seed in ("1", "2"):
        half = f"{S}/standard-seed{seed}/ckpt-{N // 2:07d}.pt"
        plan.append((f"r2_train_ft_detach_seed{seed}", train(a, f"ft-aligned-w2-detach-seed{seed}", "aligned", N // 2,
                                                            w="2", detach_uncond=True, init_from=half, seed=seed)))
    plan.append(("r2_ft_detach_seeds", cells("ft-aligned-w2-detach-seed1", "ft-aligned-w2-detach-seed2")))
    # every seed of these runs had its best FID at w_eff 3, the largest swept: one cell further out says whether
    # each one's best lies beyond it
    seeds = seed_runs(N)
    plan += [(f"r2_{name}", sweep(a, "round2", [run for loss in losses for run in seeds[loss]], "--w-eff", "5",
                                  "--steps", steps))
             for name, losses in [("strong_ft", ("ft-standard", "ft-aligned-w2", "standard-1.5x")),
                                  ("strong", ("standard", "aligned-w2-detach"))]]
    return plan


def plan_of(a, W):
    """The stages this study works through: the second round's, or those of the first that the preset runs."""
    if a.round == 2:
        return second_round(a, W)
    keep = PRESETS[a.preset]["stages"]
    return [(name, cmd) for name, cmd in stages(a, W) if keep is None or name in keep]


def command_line(cmd):
    """What a reader types for a stage: python and the script's arguments, or the torchrun or copy command."""
    return shlex.join(cmd if cmd[0] in ("cp", "torchrun") else ["python", *cmd])


# ---- the plan: each stage's time on this device, predicted before the first ----


def measure_speed(a):
    """(this device in words, {what: seconds}): the seconds of a training image of each loss ("standard", "aligned",
    "guidance-free"), of one network evaluation of an image in sampling ("sample") and of one image's Inception
    features ("inception"), timed by bench.py with random weights and data (speed does not depend on them) in the
    preset's network, precision and layout, in some seconds (14 for the cpu preset on 2 cores). A GPU is timed at the
    preset's batch, since it is busy only with a large one. On a CPU the batch doubles from 1 until a batch takes half
    a second, enough to hide the fixed cost of a call: a large network is timed on a few images, the CPU study's small
    one at its batch of 64 (stopped at 50 ms, a batch of a few images, this predicted its training at under half the
    speed it has at 64, and every training stage at twice its time)."""
    flags = train_parser().parse_args(flag_words(PRESETS[a.preset]["train"]))
    device = pick_device("auto")
    amp, channels_last, _ = fast_path(device, flags.amp, not flags.no_channels_last, flags.ch)
    tune_cuda(device, amp)
    model = UNet(ch=flags.ch, ch_mult=flags.ch_mult, num_res_blocks=flags.num_res_blocks, attn_res=flags.attn_res,
                 dropout=flags.dropout, img_size=flags.img_size).to(device)

    def seconds_per_image(rates):  # rates(batch): {what: (images (or evaluations) per second, GFLOP/s)}
        batch = flags.batch_size if device.type == "cuda" else 1
        while True:
            seconds = {what: 1 / rate for what, (rate, _) in rates(batch).items()}
            if batch == flags.batch_size or batch * max(seconds.values()) > 0.5:
                return seconds
            batch = min(2 * batch, flags.batch_size)
    speed = {**seconds_per_image(lambda b: time_training(model, b, amp, channels_last, device, repeats=1)),
             **seconds_per_image(lambda b: {"sample": time_sampling(model, b, 2, 2.0, amp, channels_last, device, 1)}),
             **seconds_per_image(lambda b: {"inception": time_fid(b, None, device, repeats=1)})}
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} thread{'s' * (threads > 1)}"
    return f"{device.type}, {name}, amp {amp}", speed


def predicted_seconds(plan, speed, nproc):
    """{stage: seconds} on this device, each stage's images times the seconds of an image of its kind (measure_speed):
    train.py, its steps from where it starts (a copied checkpoint's step) to --iters times the batch, at its loss's
    speed (the guidance-free loss at the standard one's up to --gf-start); sweep.py, in each cell n images of steps x
    2 network evaluations (CFG; a cell sampled at w = 0 takes half) and n Inception passes; fid.py, --n Inception
    passes for each image input (a statistics file costs nothing); a copy, nothing. Under --nproc K train.py and
    sweep.py take 1/K of it, as if on K such devices in perfect step. Left out: start-up, data loading, saving, KID and
    the k-NN metrics, train.py's sample grids and what a stopped stage has done already."""
    seconds, steps_of = {}, {}  # steps_of: the step a run folder's ckpt.pt holds once the stages so far have run
    for name, cmd in plan:
        words = cmd[cmd.index("--") + 1:] if cmd[0] == "torchrun" else cmd
        flag = lambda f: words[words.index(f) + 1]
        seconds[name] = 0
        if words[0] == "cp":
            step = re.search(r"ckpt-(\d+)\.pt$", words[1])
            steps_of[os.path.dirname(words[2])] = int(step[1]) if step else steps_of.get(os.path.dirname(words[1]), 0)
        elif words[0] == "train.py":
            out, loss, iters = flag("--out"), flag("--loss"), int(flag("--iters"))
            start = steps_of.get(out, 0)
            switch = min(max(start, int(flag("--gf-start"))), iters) if loss == "guidance-free" else start
            seconds[name] = int(flag("--batch-size")) * ((switch - start) * speed["standard"] +
                                                         (iters - switch) * speed[loss]) / nproc
            steps_of[out] = iters
        elif words[0] == "sweep.py":
            scales = flag("--w") if "--w" in words else flag("--w-eff")
            runs = words.index("--n") - words.index("--ckpt") - 1  # sweep() puts --n right after --ckpt's files
            cells = runs * len(scales.split(","))
            seconds[name] = cells * int(flag("--n")) * sum(2 * int(s) * speed["sample"] + speed["inception"]
                                                          for s in flag("--steps").split(",")) / nproc
        elif words[0] == "fid.py":
            inputs = words[1:next(i for i, w in enumerate(words) if w.startswith("--"))]
            seconds[name] = int(flag("--n")) * sum(not x.endswith(".npz") for x in inputs) * speed["inception"]
    return seconds


def duration(seconds):
    """'40 s', '12 min', '5.3 h', '190.4 days'."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 100 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * DAY else f"{seconds / DAY:.1f} days"


def plan_lines(where, speed, seconds, nproc):
    """The plan: the measured speed, then each stage still to run with its predicted time, then the total."""
    ms = lambda what: f"{1e3 * speed[what]:.3g} ms"
    scale = f"; train.py and sweep.py on {nproc} of them" if nproc > 1 else ""
    return [f"plan on this device ({where}{scale}): a training image {ms('standard')} standard, {ms('aligned')} "
            f"aligned, {ms('guidance-free')} guidance-free; a network evaluation in sampling {ms('sample')}; an "
            f"Inception image {ms('inception')}",
            *[f"  {name:<28}{duration(s):>12}" for name, s in seconds.items()],
            f"  {f'all {len(seconds)} stages':<28}{duration(sum(seconds.values())):>12}"]


def finished(out):
    """{stage: wall seconds} from <out>/stages.tsv, a stage's stopped attempts summed under '<stage> (stopped)'."""
    path = os.path.join(out, "stages.tsv")
    times = {}
    if os.path.exists(path):
        with open(path) as f:
            for name, seconds, *_ in csv.reader(f, delimiter="\t"):
                times[name] = times.get(name, 0) + float(seconds)
    return times


def run_stage(out, name, cmd):
    """Run one stage, its output echoed and kept in <out>/logs/<name>.log; record it once it succeeded. A signal is
    passed on to the child, which stops cleanly (train.py saves its step); the study then exits as it did."""
    print(f"=== {name}: {command_line(cmd)}", flush=True)
    t0 = time.time()
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    status = 0
    if cmd[0] == "cp":  # the continued run starts from a copy, so the original keeps its checkpoint and its cells
        os.makedirs(os.path.dirname(cmd[2]), exist_ok=True)
        shutil.copyfile(cmd[1], cmd[2] + ".tmp")
        os.replace(cmd[2] + ".tmp", cmd[2])
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]] if cmd[0] == "torchrun" else \
            [sys.executable, *cmd]
        child = subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # a terminal's Ctrl-C reaches the study, which passes it on
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda s, _: child.send_signal(s))
        with open(os.path.join(out, "logs", f"{name}.log"), "a") as log:
            for line in child.stdout:
                print(line, end="", flush=True)
                log.write(line)
        status = child.wait()
    with open(os.path.join(out, "stages.tsv"), "a") as f:  # a stopped stage's time too, so that the total is all of it
        f.write(f"{name}{' (stopped)' * bool(status)}\t{time.time() - t0:.0f}\t"
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    if status:
        print(f"study: stage {name} ended with status {status}: run the same command to resume", file=sys.stderr)
        sys.exit(status)


# ---- the report ----


def cell(r, what="fid"):
    if what == "kid":
        return f"{float(r['kid']):.4f} ± {float(r['kid_std']):.4f}"
    return f"{float(r[what]):.1f}" if what == "fid" else f"{float(r[what]):.3f}"


def table(rows, column, what, title):
    """Markdown: a row per run, a column per value of `column`."""
    cols = sorted({float(r[column]) for r in rows})
    out = [f"| {title} | " + " | ".join(f"{column} = {c:g}" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for run in dict.fromkeys(run_name(r["checkpoint"]) for r in rows):
        mine = {float(r[column]): r for r in rows if run_name(r["checkpoint"]) == run}
        out.append(f"| {run} | " + " | ".join(cell(mine[c], what) if c in mine else "" for c in cols) + " |")
    return "\n".join(out)


def report(a):
    """Tables (<results>/study.md), figures and the sweeps' results.csv files, from what has finished."""
    S, R, steps, seed_floor, real_n = a.out, a.results, PRESETS[a.preset]["steps"], f"seed{a.n}", min(a.n, 10_000)
    os.makedirs(R, exist_ok=True)
    got = {name: read_results(os.path.join(S, name, "results.csv"))
           for name in ("final", seed_floor, "equal_w", "steps10", "curves", "ablation", "seeds")}
    md = []
    for name, rows in got.items():
        if rows:
            shutil.copyfile(os.path.join(S, name, "results.csv"), os.path.join(R, f"study_{name}.csv"))
    final = got["final"]
    for what, title in [("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall")]:
        if final:
            md += [f"### {title}, {steps} DDIM steps, n = {final[0]['n']}", "", table(final, "w_eff", what, title), ""]
    best = {}
    for rows in (final, got["equal_w"]):
        for r in rows:
            run = run_name(r["checkpoint"])
            if run not in best or float(r["fid"]) < float(best[run]["fid"]):
                best[run] = r
    if best:
        md += [f"### Each model at its best w (lowest FID of its {steps}-step cells)", "",
               "| model | w | w_eff | FID | KID | precision | recall |", "|---|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {run} | {float(r['w']):g} | {float(r['w_eff']):g} | {cell(r)} | {cell(r, 'kid')} | "
               f"{cell(r, 'precision')} | {cell(r, 'recall')} |" for run, r in best.items()]
        md.append("")
        for run, r in best.items():
            folder = "final" if r in final else "equal_w"
            grid = os.path.join(S, folder, "grids", f"{run}_steps{steps}_w{float(r['w']):g}.png")
            if os.path.exists(grid):  # small images, shown 4 times as large, each pixel a square
                with Image.open(grid) as im:
                    im.resize((4 * im.width, 4 * im.height), Image.Resampling.NEAREST).save(
                        os.path.join(R, f"study_grid_{run}.png"))
    half = [r for r in got["curves"] if run_name(r["checkpoint"]) in [f"{m}@{a.iters // 2}" for m in MODELS[:2]]]
    standard = [r for r in final if run_name(r["checkpoint"]) == "standard"]  # its w is its w_eff
    for name, column, title, extra in [("equal_w", "w", "aligned at equal sampling w, beside standard", standard),
                                       ("steps10", "w_eff", "10 DDIM steps", []),
                                       ("ablation", "w_eff", f"ablation at step {a.iters // 2}, beside the main runs",
                                        half)]:
        rows = got[name] + [r for r in extra if float(r[column]) in {float(x[column]) for x in got[name]}]
        for what in ("fid", "kid") if rows else ():
            md += [f"### {title}: {what.upper()}", "", table(rows, column, what, what.upper()), ""]
    seed = got[seed_floor]
    if seed:
        md += [f"### Noise floor: the same cells from seeds {a.n}.. instead of 0..", "",
               f"| model, w_eff | FID seed 0 | FID seed {a.n} | KID seed 0 | KID seed {a.n} |",
               "|---|---:|---:|---:|---:|"]
        for r in seed:
            twin = next((f for f in final if f["checkpoint"] == r["checkpoint"] and f["w"] == r["w"]), None)
            if twin:
                md.append(f"| {run_name(r['checkpoint'])}, {float(r['w_eff']):g} | {cell(twin)} | {cell(r)} | "
                          f"{cell(twin, 'kid')} | {cell(r, 'kid')} |")
        md.append("")
    if got["seeds"]:  # seed 0 is the main runs' final sweep
        fid = {(run_name(r["checkpoint"]), float(r["w_eff"])): float(r["fid"]) for r in final + got["seeds"]}
        md += seed_tables(fid, sorted({float(r["w_eff"]) for r in got["seeds"]}))
    real = os.path.join(S, "logs", "realvsreal.log")
    if os.path.exists(real):  # fid.py's lines: 'KID: m ± s', 'precision: p', ..., 'FID: f'
        with open(real) as f:
            figures = dict(line.strip().split(": ", 1) for line in f if line.split(":")[0] in
                           ("KID", "precision", "recall", "density", "coverage", "FID"))
        md += [f"Real against real ({real_n} test images against the reference): " +
               ", ".join(f"{k} {v}" for k, v in figures.items()), ""]
    step = lambda r: int(run_name(r["checkpoint"]).partition("@")[2] or a.iters)
    curves = [r for r in got["curves"] + [r for r in got["steps10"] if run_name(r["checkpoint"]) in MODELS[:3]]
              if not (run_name(r["checkpoint"]).startswith("guidance-free") and step(r) <= a.iters // 2)]
    if got["curves"]:  # the guidance-free run is the standard one, bitwise, up to its --gf-start of N/2: left out
        for what, title in [("fid", "FID"), ("kid", "KID")]:
            md += [f"### Learning curves: {title} by training step (10 DDIM steps)", "",
                   "| model, w_eff | " + " | ".join(f"step {s}" for s in sorted({step(r) for r in curves})) + " |",
                   "|---|" + "---:|" * len({step(r) for r in curves})]
            for run in MODELS[:3]:
                for w_eff in (0.0, 1.0):
                    mine = {step(r): r for r in curves if run_name(r["checkpoint"]).split("@")[0] == run
                            and float(r["w_eff"]) == w_eff}
                    md.append(f"| {run}, {w_eff:g} | " + " | ".join(cell(mine[s], what) if s in mine else ""
                                                                    for s in sorted({step(r) for r in curves})) + " |")
            md.append("")
        plot_curves(curves, step, os.path.join(R, "study_curves.png"))
    if final and not plot(final, "w_eff", os.path.join(R, "study_final.png")):
        warn("matplotlib is not installed: no figures (pip install matplotlib)")
    md += wall_times(finished(S))
    write_atomic(os.path.join(R, "study.md"), lambda f: f.write("\n".join(md).encode()))
    print(f"wrote {R}/study.md and the figures and csv files beside it")


def wall_times(times):
    """Markdown: the minutes of each stage in `times` ({stage: seconds}), a resumed stage's attempts summed."""
    for name in [n for n in times if n.endswith(" (stopped)") and n.removesuffix(" (stopped)") in times]:
        times[name.removesuffix(" (stopped)")] += times.pop(name)
    return ["### Wall time of each stage", "", "| stage | minutes |", "|---|---:|",
            *[f"| {name} | {seconds / 60:.1f} |" for name, seconds in times.items()],
            f"| all | {sum(times.values()) / 60:.1f} |", ""]


def seed_runs(N):
    """{loss: its runs at training seeds 0, 1, 2}; seed 0 of standard at 3N/2 is a checkpoint of the run to 2N."""
    runs = {loss: [loss, f"{loss}-seed1", f"{loss}-seed2"]
            for loss in ("standard", "aligned-w2", "aligned-w2-detach", "ft-standard", "ft-aligned-w2",
                         "ft-aligned-w2-detach")}
    return {**runs, "standard-1.5x": [f"standard-2x@{3 * N // 2}", "standard-1.5x-seed1", "standard-1.5x-seed2"]}


# the pairs whose difference per seed the report gives: each variant against its control at equal steps, and
# fine-tuning against standard at equal compute
PAIRS = [("aligned-w2", "standard"), ("aligned-w2-detach", "standard"), ("ft-aligned-w2", "ft-standard"),
         ("ft-aligned-w2-detach", "ft-standard"), ("ft-aligned-w2", "standard-1.5x")]


def ablations(N):
    """(title, runs) of the second round's tables of every figure, the reference runs (standard, aligned-w2) among them."""
    seeds = seed_runs(N)
    by_seed = lambda *losses: [seeds[loss][i] for i in range(3) for loss in losses]  # each seed's runs side by side
    return [("training seeds", seeds["standard"] + seeds["aligned-w2"]),
            ("the gradient into eps(z, null)", by_seed("aligned-w2", "aligned-w2-detach")),
            (f"fine-tuning the standard model of step {N // 2} for {N // 2} steps, beside standard at {N} and at "
             f"{3 * N // 2} (equal compute)",
             ["standard", *by_seed("ft-standard", "ft-aligned-w2", "ft-aligned-w2-detach", "standard-1.5x")]),
            ("the dose-response in w_t (w_t = 0 is the standard loss)",
             ["standard", "aligned-w0.5", "aligned-w1", "aligned-w2", "aligned-w4"]),
            (f"longer training: {N}, {2 * N}, {4 * N} and {8 * N} steps", list(long_steps(N)))]


def long_steps(N):
    """{run: its training step} of the longer-training runs, standard's and both aligned variants', in the order of
    their curves."""
    return {"standard": N, "standard-2x": 2 * N, "standard-4x": 4 * N, "standard-8x": 8 * N,
            "aligned-w2": N, f"aligned-w2-4x@{2 * N}": 2 * N, "aligned-w2-4x": 4 * N,
            "aligned-w2-detach": N, f"aligned-w2-detach-4x@{2 * N}": 2 * N, "aligned-w2-detach-4x": 4 * N}


def seed_tables(fid, cols, N):
    """Markdown: the FID of training seeds 0, 1 and 2 of each loss at each w_eff of cols, with their mean and range,
    then the paired difference of each of PAIRS per seed; fid is {(run, w_eff): FID}. A loss with no cell is left out."""
    seeds = seed_runs(N)
    md = ["### Training seeds: FID of seeds 0, 1, 2 (mean, min-max)", "",
          "| loss, w_eff | seed 0 | seed 1 | seed 2 | mean | min-max |", "|---|---:|---:|---:|---:|---:|"]
    for loss, runs in seeds.items():
        for w in cols if any(run == r for r, _ in fid for run in runs) else ():
            got = [fid.get((run, w)) for run in runs]
            have = [f for f in got if f is not None]
            md.append(f"| {loss}, {w:g} | " + " | ".join("" if f is None else f"{f:.1f}" for f in got) +
                      (f" | {np.mean(have):.1f} | {min(have):.1f}-{max(have):.1f} |" if have else " | | |"))
    md += ["", "### Paired difference of FID per training seed (same initial weights and data order)",
           "", "| pair, w_eff | seed 0 | seed 1 | seed 2 | mean |", "|---|---:|---:|---:|---:|"]
    for loss, base in PAIRS:
        for w in cols:
            diff = [fid[(run, w)] - fid[(ref, w)] if (run, w) in fid and (ref, w) in fid else None
                    for run, ref in zip(seeds[loss], seeds[base])]
            have = [d for d in diff if d is not None]
            if have:
                md.append(f"| {loss} - {base}, {w:g} | " + " | ".join("" if d is None else f"{d:+.1f}" for d in diff)
                          + f" | {np.mean(have):+.1f} |")
    md.append("")
    return md


def report_second_round(a):
    """<results>/study_round2.md and its figure, from <out>/round2/results.csv: the training-seed spread of each cell
    and the paired difference per seed first, then each ablation's runs side by side."""
    S, R = a.out, a.results
    rows = read_results(os.path.join(S, "round2", "results.csv"))
    if not rows:
        return print(f"study: {S}/round2/results.csv has no cells yet")
    os.makedirs(R, exist_ok=True)
    shutil.copyfile(os.path.join(S, "round2", "results.csv"), os.path.join(R, "study_round2.csv"))
    fid = {(run_name(r["checkpoint"]), float(r["w_eff"])): float(r["fid"]) for r in rows}
    md = seed_tables(fid, sorted({w for _, w in fid}), a.iters)
    for title, runs in ablations(a.iters):
        mine = sorted((r for r in rows if run_name(r["checkpoint"]) in runs),
                      key=lambda r: runs.index(run_name(r["checkpoint"])))
        if {run_name(r["checkpoint"]) for r in mine} <= {"standard", "aligned-w2"}:  # none of its own runs yet
            continue
        for what in ("fid", "kid", "precision", "recall"):
            md += [f"### {title}: {what.upper() if what in ('fid', 'kid') else what}", "",
                   table(mine, "w_eff", what, what.upper() if what in ("fid", "kid") else what), ""]
    md += wall_times({name: s for name, s in finished(S).items() if name.split(" ")[0] in dict(second_round(a))})
    write_atomic(os.path.join(R, "study_round2.md"), lambda f: f.write("\n".join(md).encode()))
    plot_dose(fid, os.path.join(R, "study_round2_wt.png"))
    at = long_steps(a.iters)
    plot_curves([r for r in rows if run_name(r["checkpoint"]) in at], lambda r: at[run_name(r["checkpoint"])],
                os.path.join(R, "study_round2_long.png"), ("standard", "aligned", "aligned --detach-uncond"),
                lambda run: "aligned --detach-uncond" if "detach" in run else run.split("-")[0])
    print(f"wrote {R}/study_round2.md and the figures and csv file beside it")


def plot_dose(fid, path):
    """FID at w_eff 1 and 3 against the training w_t (0: the standard loss), one line per training seed."""
    if (plt := pyplot()) is None:
        return
    lines = {"seed 0": [(0, "standard"), (0.5, "aligned-w0.5"), (1, "aligned-w1"), (2, "aligned-w2"), (4, "aligned-w4")],
             **{f"seed {s}": [(0, f"standard-seed{s}"), (2, f"aligned-w2-seed{s}")] for s in (1, 2)}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, w_eff in zip(axes, (1.0, 3.0)):
        for label_, points in lines.items():
            xy = [(w_t, fid[(run, w_eff)]) for w_t, run in points if (run, w_eff) in fid]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=label_)
        ax.set(xlabel="training w_t (0: standard loss)", ylabel="FID", title=f"FID at w_eff = {w_eff:g}")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(rows, step, path, lines=tuple(MODELS[:3]), line=lambda run: run.split("@")[0]):
    """FID and KID at w_eff 0 and 1 against the training step, step(row); a line per name of lines, line(run)."""
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for row, what in enumerate(("fid", "kid")):
        for ax, w_eff in zip(axes[row], (0.0, 1.0)):
            for name in lines:
                points = sorted((step(r), float(r[what])) for r in rows
                                if line(run_name(r["checkpoint"])) == name and float(r["w_eff"]) == w_eff)
                if points:
                    ax.plot(*zip(*points), marker="o", label=name)
            ax.set(xlabel="training step", ylabel=what.upper(), title=f"{what.upper()} at w_eff = {w_eff:g}")
            if ax.lines:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def announce(a):
    """Print the plan of the stages still to run, under --list after every stage's command line; its total seconds."""
    done, W = finished(a.out), standard_best_w(a)
    plan = plan_of(a, W or "W")
    todo = [name for name, _ in plan if name not in done]
    if a.list:
        for name, cmd in plan:
            print(f"{'done' if name in done else 'todo'} {name}: {command_line(cmd)}")
    if not todo:
        return 0
    where, speed = measure_speed(a)
    seconds = predicted_seconds(plan, speed, a.nproc)
    seconds = {name: seconds[name] for name in todo}
    print("\n".join(plan_lines(where, speed, seconds, a.nproc)), flush=True)
    return sum(seconds.values())


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="cpu: RESULTS.md's study, 16 x 16 on a CPU; "
                   "gpu: the paper's scale, 32 x 32 and 50,000 samples a cell; tiny: every kind of stage in seconds")
    p.add_argument("--data", default="cifar10", help="training images: cifar10 (downloaded) or a folder of class "
                   "sub-folders, e.g. an image-folder copy of CIFAR-10's training set")
    p.add_argument("--test", default="cifar10-test", help="the real images scored against the reference for the "
                   "real-vs-real noise floor: cifar10-test or a folder")
    p.add_argument("--out", type=output_dir, help="folder of the runs, sweeps and stages.tsv, one for each preset "
                   "(default: runs/study for cpu, runs/study-<preset> for the others)")
    p.add_argument("--results", type=output_dir, default="results", help="--report: folder for tables and figures")
    p.add_argument("--iters", type=number(int, lo=4, multiple=4), help="training steps N of each model (a multiple of "
                   "4: checkpoints are kept at N/4, N/2, 3N/4 and N; default: the preset's, 1600 for cpu)")
    p.add_argument("--n", type=number(int, lo=4, multiple=2), help="images per sweep cell (even: KID's subsets are "
                   "n/2; default: the preset's, 1000 for cpu)")
    p.add_argument("--nproc", type=number(int, lo=1), default=1, help="processes of each train.py and sweep.py stage, "
                   "under torchrun --standalone (one a GPU), with one process's global batch and sampled images")
    p.add_argument("--round", type=int, choices=[1, 2], default=1, help="1: the first round; 2: the second (training "
                   "seeds, --detach-uncond, fine-tuning, w_t, 4N steps), with the first round's stages it builds on")
    p.add_argument("--list", action="store_true", help="print every stage's command line, whether it finished, and "
                   "the plan of those still to run")
    p.add_argument("--yes", action="store_true", help="start even if the plan takes more than a day on this device")
    p.add_argument("--report", action="store_true", help="write the tables and figures from the finished stages")
    a = p.parse_args(argv)
    a.iters, a.n = a.iters or PRESETS[a.preset]["iters"], a.n or PRESETS[a.preset]["n"]
    a.out = a.out or ("runs/study" if a.preset == "cpu" else f"runs/study-{a.preset}")
    if a.data != "cifar10" and not os.path.isdir(a.data):
        p.error(f"--data {a.data}: no such folder")
    if a.test != "cifar10-test" and not os.path.isdir(a.test):
        p.error(f"--test {a.test}: no such folder")
    if a.report:
        return report(a) if a.round == 1 else report_second_round(a)
    if a.list:
        announce(a)
        return
    made = not os.path.isdir(a.out)
    with lock_folder(a.out):  # held until the study ends, however it ends
        total = announce(a)
        if total > DAY and not a.yes:
            if made:  # nothing was written: leave no folder behind
                shutil.rmtree(a.out)
            p.error(f"the plan takes {duration(total)} on this device, more than a day: add --yes to start it all "
                    f"the same")
        while True:
            done, W = finished(a.out), standard_best_w(a)
            todo = [(name, cmd) for name, cmd in plan_of(a, W or "W") if name not in done]
            if not todo:
                print(f"study: every stage is done ({sum(done.values()) / 60:.0f} min in all): the same command with "
                      f"--report writes the tables")
                return
            if "W" in todo[0][1]:
                p.error(f"stage {todo[0][0]} needs the standard model's best w_eff, but {a.out}/final/results.csv "
                        f"lacks some of its cells: delete the final_standard line of {a.out}/stages.tsv to sweep them "
                        f"again")
            run_stage(a.out, *todo[0])


if __name__ == "__main__":
    main()
