"""
Train LeNet-5, ResNet-18 or a GPT while pruning, with AdamWPrune or a baseline optimizer and pruning method.

    $ python train.py --optimizer adamwprune --sparsity 0.7   # LeNet-5 on Fashion-MNIST (the defaults)
    $ python train.py --optimizer adamw                       # the dense AdamW baseline
    $ python train.py --optimizer adamw --pruning movement
    $ python train.py --importance variance --sparsity 0.9
    $ python train.py --model resnet18 --amp bf16             # CIFAR-10 on a CUDA GPU
    $ python train.py --model gpt --sparsity 0.5              # a character GPT on Tiny Shakespeare
    $ python train.py --out results/fm --resume               # continue after a stop
    $ python train.py --dry-run                               # one tiny pass, for CI
    $ python train.py --compare                               # every pairing of the study, with plots
    $ torchrun --standalone --nproc-per-node 2 train.py       # 2 processes (DDP); add --fsdp to shard

Every run writes DIR/results.json (config, per-epoch history, sparsity and memory timelines, versions,
"final"; accuracies in percent; the GPT's in validation loss), DIR/checkpoint.pt after each epoch
(torchrun --fsdp: process N's checkpoint.rankN.pt) and, when it prunes, DIR/model.pruned.pt: the pruned
weights, compacted (adamwprune.compact_state_dict). The data set lives on the device as uint8 tensors
(text: as tokens); batches are gathered and augmented (ResNet-18, CIFAR-10) there. The GPT's "epoch" is
an evaluation interval: 250 optimizer steps on random windows of the text; its default 8 epochs are
nanoGPT's 2,000 steps.
"""
import argparse
import collections
import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import signal
import sys
import time
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from adamwprune import (DEFAULT_IMPORTANCE, IMPORTANCES, AdamWPrune, compact_state_dict, local,
                        mask_update_due, prunable, prune_lowest)
import memory
import plot
from models import GPT, GPT_SHAPES, build_model

# --- config ---
Dataset = collections.namedtuple("Dataset", "torchvision channels side classes train_images mean std")
DATASETS = {  # mean and std: per channel, of the training images scaled to [0, 1]
    "mnist": Dataset("MNIST", 1, 28, 10, 60000, (0.1307,), (0.3081,)),
    "fashion-mnist": Dataset("FashionMNIST", 1, 28, 10, 60000, (0.2860,), (0.3530,)),
    "cifar10": Dataset("CIFAR10", 3, 32, 10, 50000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
TEXTS = {  # name: (file in --data-dir, where it is downloaded from, its sha256): nanoGPT's shakespeare_char
    "shakespeare": ("tinyshakespeare.txt",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
                    "input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
SYSTEM_DATA_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # Debian's dataset-fashion-mnist
DEFAULT_DATASET = {"lenet5": "fashion-mnist", "resnet18": "cifar10", "gpt": "shakespeare"}
DEFAULT_EPOCHS = {"lenet5": 10, "resnet18": 50, "gpt": 8}  # resnet18: not measured on this project's CPUs
DEFAULT_LR_SCHEDULE = {"lenet5": "constant", "resnet18": "cosine",  # cosine: SGDR (Loshchilov & Hutter 2017)
                       "gpt": "warmup-cosine"}  # nanoGPT's: linear warm-up, then cosine down to lr / 10
OPTIMIZERS = {  # name: (learning rate, weight decay, the GPT's learning rate); rates: the sweeps in README.md
    "sgd": (0.03, 5e-4, 0.3),  # momentum 0.9, L2 decay in the gradient
    "adam": (1e-3, 0.0, 1e-3),
    "adamw": (1e-3, 1e-2, 1e-3),  # decoupled decay, torch's default (the GPT: nanoGPT's 0.1)
    "adamwadv": (3e-3, 1e-2, 1e-3),  # + amsgrad, cosine lr whatever --lr-schedule, grad-norm clipping
    "adamwspam": (1e-3, 1e-2, 1e-3),
    "adamwprune": (1e-3, 1e-2, 1e-3),  # AdamW's: the comparison shares one recipe
}
PRUNINGS = ("none", "magnitude", "movement", "state")
DEFAULT_SPARSITY = {"lenet5": 0.7, "resnet18": 0.7, "gpt": 0.5}  # when pruning
SCHEDULE = "cubic"  # every method's sparsity schedule (Zhu & Gupta 2017)
PRUNE_START_FRACTION = 0.1  # default --prune-start: this fraction of all optimizer steps
PRUNE_END_FRACTION = 0.6  # default --prune-end: the rest of the run fine-tunes at the final sparsity
PRUNE_UPDATES_PER_EPOCH = 20  # default --prune-every: steps per epoch / this
CLIP_GRAD_NORM = 1.0  # adamwadv, and every optimizer on the GPT (nanoGPT's grad_clip)
BATCH_SIZE = {"lenet5": 128, "resnet18": 128, "gpt": 12}  # the GPT's: windows of 64 characters
EVAL_BATCH_SIZE = 1000
TIMELINE_SAMPLES = 200  # memory and sparsity are sampled about this many times per run
DRY_RUN_BATCHES = 2  # --dry-run: one epoch of this many batches (and as many test images)
GPT_SHAPE, GPT_BETAS, GPT_WEIGHT_DECAY = "gpt-tiny", (0.9, 0.99), 0.1  # nanoGPT's shakespeare_char recipe
EVAL_INTERVAL = 250  # the GPT's epoch: optimizer steps between evaluations (nanoGPT's eval_interval)
EVAL_WINDOWS = 480  # fixed validation windows, 64 characters each: the forward passes of nanoGPT's evaluation
WARMUP_STEPS, MIN_LR_FRACTION = 100, 0.1  # warmup-cosine: lr (t + 1) / 101 for t < 100, a cosine to lr / 10


def train_images(config):
    """How many training images the run uses: its pruning schedule is laid out for this many."""
    return min(DATASETS[config["dataset"]].train_images, config["limit"] or math.inf)


def steps_per_epoch(config):
    """A pass over the training images; the GPT's: EVAL_INTERVAL steps (--limit N: of N windows in all)."""
    if config["model"] == "gpt":
        windows = min(EVAL_INTERVAL * config["batch_size"], config["limit"] or math.inf)
        return math.ceil(windows / config["batch_size"])
    return math.ceil(train_images(config) / config["batch_size"])


class RunError(Exception):
    """A problem the user can fix (missing data, a damaged file, other flags): main() prints it."""


# --- data, held on the device (read from the files by the functions at "the data sets on disk") ---
def random_crop_flip(images, shifts, flips, pad=4):
    """Random crop after zero-padding by `pad`, then a horizontal flip, for a whole batch at once: CIFAR-10's
    augmentation (He et al. 2016), which Zhong et al. 2020 (arXiv:1708.04896) used on Fashion-MNIST too.
    images (B, C, H, W); shifts (B, 2) in [0, 2 * pad]; flips (B,) bool."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad)
    arange = lambda n: torch.arange(n, device=images.device)
    rows = shifts[:, 0, None] + arange(height)  # (B, H)
    cols = shifts[:, 1, None] + arange(width)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    return padded[arange(batch)[:, None, None, None], arange(channels)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class DeviceData:
    """One split held whole as uint8 tensors on the device, served as normalised float batches."""

    def __init__(self, images, labels, mean, std, augment, channels_last):
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) int64
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
        self.augment, self.channels_last = augment, channels_last
        self.device, self.targets_per_row = images.device, 1  # a label per image

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size, generator=None, rank=0, ranks=1):
        """(x, y) batches: in order, or shuffled (and augmented) by the CPU `generator`; this rank's."""
        n, device, order = len(self), self.images.device, None
        augment = self.augment and generator is not None
        if generator is not None:  # one permutation per epoch; augmentation drawn per image, all at once
            order = torch.randperm(n, generator=generator).to(device)
        if augment:
            shifts = torch.randint(0, 9, (n, 2), generator=generator).to(device)
            flips = (torch.rand(n, generator=generator) < 0.5).to(device)
        for start in range(0, n, batch_size):
            lo, hi = (start + min(batch_size, n - start) * r // ranks for r in (rank, rank + 1))
            index = slice(lo, hi) if order is None else order[lo:hi]
            x = self.images[index]  # (B, C, H, W) uint8
            if augment:
                x = random_crop_flip(x, shifts[lo:hi], flips[lo:hi])
            x = x.float().sub_(self.mean).div_(self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index]


class TextData:
    """One split of a text held whole as tokens on the device, served as (B, T) windows of it and their
    next tokens: len(self) windows at random starts drawn by the CPU `generator` (training), or the
    fixed `starts` in order (evaluation)."""

    def __init__(self, tokens, context, windows=0, starts=None):
        self.tokens, self.context, self.starts = tokens, context, starts  # (N,) int64; T; (W,) or None
        self.windows = windows if starts is None else len(starts)
        self.device, self.targets_per_row = tokens.device, context  # a next token per position

    def __len__(self):
        return self.windows

    def batches(self, batch_size, generator=None, rank=0, ranks=1):
        starts = self.starts if generator is None else torch.randint(
            len(self.tokens) - self.context, (len(self),), generator=generator).to(self.device)
        offsets = torch.arange(self.context + 1, device=self.device)  # a window and the token after it
        for start in range(0, len(self), batch_size):
            lo, hi = (start + min(batch_size, len(self) - start) * r // ranks for r in (rank, rank + 1))
            rows = self.tokens[starts[lo:hi, None] + offsets]  # (B, T + 1)
            yield rows[:, :-1], rows[:, 1:]  # inputs and targets, each (B, T)


def load_data(config, device):
    """(train, test) data on the device: DeviceData limited to --limit images each, or for the GPT
    TextData: the first 90% of the text for training, EVAL_WINDOWS fixed windows of the rest (seed 0:
    every run evaluates on the same windows) for validation."""
    if config["model"] == "gpt":
        tokens, _ = load_text(config["dataset"], config["data_dir"])
        split, context = len(tokens) * 9 // 10, GPT_SHAPES[GPT_SHAPE]["block_size"]
        train, val = tokens[:split].to(device), tokens[split:].to(device)
        starts = torch.randint(len(val) - context, (min(EVAL_WINDOWS, config["limit"] or math.inf),),
                               generator=torch.Generator().manual_seed(0)).to(device)
        windows = steps_per_epoch(config) * config["batch_size"]
        return TextData(train, context, windows), TextData(val, context, starts=starts)
    dataset, arrays = DATASETS[config["dataset"]], load_dataset(config["dataset"], config["data_dir"])
    for split, images, labels in (("training", *arrays[:2]), ("test", *arrays[2:])):
        if len(images) != len(labels):
            raise RunError(f"{config['dataset']} in {config['data_dir']}: its {split} images file holds "
                           f"{len(images)} images, its labels file {len(labels)}: re-copy them")
    images_train, labels_train, images_test, labels_test = [a[:config["limit"]].to(device) for a in arrays]
    if len(images_train) != (expected := train_images(config)):  # the pruning schedule was laid out for it
        raise RunError(f"{config['dataset']} in {config['data_dir']} has {len(images_train)} training "
                       f"images, not {expected}: replace the files, or pass --limit {len(images_train)}")
    options = dict(mean=dataset.mean, std=dataset.std, channels_last=channels_last_for(config))
    augment = config["dataset"] == "cifar10" or config["model"] == "resnet18"  # not LeNet-5 on MNIST
    return (DeviceData(images_train, labels_train.long(), augment=augment, **options),
            DeviceData(images_test, labels_test.long(), augment=False, **options))


# --- model ---
def channels_last_for(config):
    return config["model"] == "resnet18" and config["amp"] == "bf16"  # --amp bf16 implies CUDA


def make_model(config, device):
    if config["model"] == "gpt":
        return GPT(**GPT_SHAPES[GPT_SHAPE]).to(device)  # its vocabulary: Tiny Shakespeare's 65 characters
    dataset = DATASETS[config["dataset"]]
    model = build_model(config["model"], dataset.channels, dataset.classes, dataset.side).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last_for(config) else model


# --- the optimizers and pruning methods of the comparison ---
# SPAM: Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset ..." (ICLR 2025, arXiv:2501.06842)
class AdamWSPAM(torch.optim.Optimizer):
    """AdamW with SPAM's periodic momentum reset, spike-aware clipping and warmup after a reset.
    At group step t (1-based), with since = t mod reset_interval:
        1. if since == 0: exp_avg, exp_avg_sq <- 0 (the reset; bias correction keeps counting)
        2. if t >= clip_after and since >= clip_after (v has re-accumulated after the reset):
               g <- sign(g) * sqrt(threshold * v)  where  g^2 > threshold * v
        3. AdamW on g, the step scaled by the cosine warmup
               scale = 1 - 0.99 * (1 + cos(pi * since / (warmup_steps + 1))) / 2  for since < warmup_steps
           after each reset (1 before the first reset and after the warmup).
    Defaults: the authors' code's (threshold 5000, reset_interval 500, warmup_steps 150, clip_after 20)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 threshold=5000.0, reset_interval=500, warmup_steps=150, clip_after=20):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
                        reset_interval=reset_interval, warmup_steps=warmup_steps, clip_after=clip_after,
                        spam_step=0)  # spam_step: the group's step count, for resets and warmups
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["spam_step"] = t = group["spam_step"] + 1
            since = t % group["reset_interval"]  # steps since the last reset
            warmup = t >= group["reset_interval"] and since < group["warmup_steps"]
            warmup_scale = 1 - 0.99 * (1 + math.cos(math.pi * since / (group["warmup_steps"] + 1))) / 2
            scale = warmup_scale if warmup else 1.0
            clip = t >= group["clip_after"] and since >= group["clip_after"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # m, the running average of g
                    state["exp_avg_sq"] = torch.zeros_like(p)  # v, the running average of g^2
                exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], p.grad
                if since == 0:
                    exp_avg.zero_()
                    exp_avg_sq.zero_()
                if clip:
                    bound = exp_avg_sq.mul(group["threshold"]).sqrt_()  # the largest |g| that is no spike
                    grad = torch.where(grad.abs() > bound, grad.sign() * bound, grad)
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] * scale / (1 - beta1 ** state["step"]))


class GradualPruning:
    """Global pruning of a model's prunable tensors on AdamWPrune's schedule and threshold path: after
    an optimizer step where mask_update_due, prune_lowest prunes the lowest scores of the kept weights
    to exactly k = target_count(s(t), N) (ties by position; global under FSDP2 too); then pruned weights
    are zeroed. A bool mask per tensor (1 B per weight); subclasses score a tensor (tensor_scores)."""

    def __init__(self, params, sparsity, prune_start, prune_end, prune_every, schedule=SCHEDULE,
                 check_replicas=None):
        self.group = dict(sparsity=sparsity, schedule=schedule, prune_start=prune_start, prune_end=prune_end,
                          prune_every=prune_every, optimizer_step=0)  # AdamWPrune's param-group keys
        self.params = [p for p in params if prunable(p, self.group)]
        self.masks = [torch.ones_like(local(p), dtype=torch.bool) for p in self.params]  # True = kept
        self.check_replicas = check_replicas

    @property
    def optimizer_step(self):
        return self.group["optimizer_step"]

    def observe(self):
        """Called after backward, before the optimizer step."""

    @torch.no_grad()
    def step(self):
        """Called after every optimizer step: update the masks when due, then zero pruned weights."""
        self.group["optimizer_step"] += 1
        if mask_update_due(self.optimizer_step, self.group) and self.params:
            index = {p: i for i, p in enumerate(self.params)}  # tensors hash by identity
            scores = lambda p: self.tensor_scores(index[p]).flatten().float().masked_fill(
                ~self.masks[index[p]].flatten(), -math.inf)  # the pruned at -inf
            prune_lowest(self.params, self.group, scores, lambda p, prune: self.masks[index[p]].logical_and_(
                ~prune.view(self.masks[index[p]].shape)), check_replicas=self.check_replicas)
        for p, mask in zip(self.params, self.masks):
            local(p).mul_(mask)

    def buffers(self):
        """The tensors this method keeps: for memory accounting, and all of its state but the clock."""
        return list(self.masks)

    def state_dict(self):
        return {"optimizer_step": self.optimizer_step, "buffers": self.buffers()}

    def load_state_dict(self, state):
        self.group["optimizer_step"] = state["optimizer_step"]
        for buffer, saved in zip(self.buffers(), state["buffers"]):
            buffer.copy_(saved)


# Gradual magnitude pruning: Zhu & Gupta 2017, "To prune, or not to prune" (arXiv:1710.01878)
class MagnitudePruning(GradualPruning):
    """Prunes the smallest |w|. Keeps the mask only."""

    def tensor_scores(self, i):
        return local(self.params[i]).abs()


# Movement pruning: Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (2005.07683)
class MovementPruning(GradualPruning):
    """Prunes the weights moving towards zero: score S = -sum over steps of dL/dW * W, the paper's
    accumulated score (its score learning rate folded away: a constant does not change a top-k). Keeps a
    float32 score (4 B) and the mask (1 B) per weight; no copy of the initial weights, which only rewinding
    methods keep. Unlike the paper's per-step top-k, masks are monotone, as for every method here."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.score = [torch.zeros_like(local(p), dtype=torch.float32) for p in self.params]  # S, per weight

    @torch.no_grad()
    def observe(self):
        for score, p in zip(self.score, self.params):
            if p.grad is not None:
                score.addcmul_(local(p.grad), local(p), value=-1)

    def tensor_scores(self, i):
        return self.score[i]

    def buffers(self):
        return self.masks + self.score


# --- the loop: one epoch, an evaluation, a whole run ---
def train_epoch(state, data, epoch, show_progress=None):
    """One epoch over `data`, shuffled (and augmented) by state.generator; (mean loss, accuracy %) per target
    (an image's label; each next character of a window). On a terminal one line updates in place (every
    half second: that reads the loss, a sync)."""
    model, optimizer, config, (rank, ranks) = state.model, state.optimizer, state.config, rank_and_world()
    show_progress = sys.stdout.isatty() if show_progress is None else show_progress
    model.train()
    loss_sum, correct = torch.zeros(2, dtype=torch.float64, device=data.device)  # this rank's
    steps, seen = math.ceil(len(data) / config["batch_size"]), 0  # seen: this rank's targets
    start = last_shown = time.perf_counter()
    buffers = state.pruning.buffers() if state.pruning else []
    first_bad = torch.zeros((), dtype=torch.float64, device=data.device)  # step of a nan/inf loss
    for i, (x, y) in enumerate(data.batches(config["batch_size"], state.generator, rank, ranks), 1):
        t = state.step + 1  # this optimizer step; memory is measured every few steps and at mask updates
        sample = t % state.monitor.every == 0 or config["pruning"] != "none" and mask_update_due(t, config)
        with state.monitor.step(t, model, optimizer, buffers, sample=sample):
            # 1) forward and backward: the mean loss of the whole batch, as DDP and FSDP2 average over ranks
            with autocast(config):
                logits = model(x)  # (B, classes); the GPT's (B, T, vocabulary)
                loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")  # this rank's
            optimizer.zero_grad(set_to_none=True)
            rows = min(config["batch_size"], len(data) - (i - 1) * config["batch_size"])  # of every rank
            (loss * ranks / (rows * data.targets_per_row)).backward()
            # 2) the update
            update(config, model, optimizer, state.scheduler, state.pruning)
        state.step += 1
        # 3) bookkeeping, on the device until shown
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), state.step, first_bad)
        loss_sum += loss.detach()
        correct += (logits.argmax(-1) == y).sum()
        seen += y.numel()
        if state.step % state.monitor.every == 0:
            state.sparsity_timeline.append({"step": state.step, "sparsity": prunable_sparsity(model)})
        now = time.perf_counter()
        if show_progress and seen and (now - last_shown > 0.5 or i == steps):  # rank 0's slices
            last_shown, elapsed = now, now - start
            memory_bytes = state.monitor.timeline[-1]["step_peak_bytes"] if state.monitor.timeline else 0
            print(f"\repoch {epoch}/{config['epochs']} [{i:>{len(str(steps))}}/{steps}] "
                  f"loss {loss_sum / seen:.4f} acc {100.0 * correct / seen:5.2f}% "
                  f"{seen * ranks / elapsed:,.0f} {'tok' if config['model'] == 'gpt' else 'img'}/s "
                  f"ETA {elapsed / i * (steps - i):3.0f} s mem {memory.format_bytes(memory_bytes)}",
                  end="", flush=True)
    loss_sum, correct, seen = over_ranks([loss_sum, correct, seen], loss_sum.device)
    if bad_step := int(over_ranks([first_bad], first_bad.device, dist.ReduceOp.MAX)[0]):
        raise RunError(f"the training loss is {loss_sum / seen} from step {bad_step} (epoch {epoch}) on: the "
                       f"run diverged; lower --lr (it is {config['lr']:g}). Earlier checkpoints stay")
    return loss_sum / seen, 100.0 * correct / seen


def update(config, model, optimizer, scheduler, pruning):
    """A training step after backward: pruning scores see this step's gradients; masks act after the step."""
    if pruning:
        pruning.observe()
    if config["optimizer"] == "adamwadv" or config["model"] == "gpt":
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)
    optimizer.step()
    if scheduler:
        scheduler.step()
    if pruning:
        pruning.step()


def autocast(config):
    bf16 = config["amp"] == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, data, config):
    """(mean loss, accuracy in percent) per target over `data` (each rank evaluates its slices)."""
    model.eval()
    loss_sum, correct = torch.zeros(2, dtype=torch.float64, device=data.device)  # read at the end
    for x, y in data.batches(EVAL_BATCH_SIZE, None, *rank_and_world()):
        with autocast(config):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    if hasattr(model, "reshard"):  # FSDP2 leaves the root's own parameters (the GPT's embeddings) gathered
        model.reshard()  # after a forward with no backward: shards again, as everything else expects
    loss_sum, correct = over_ranks([loss_sum, correct], loss_sum.device)
    targets = len(data) * data.targets_per_row
    return loss_sum / targets, 100.0 * correct / targets


def prunable_sparsity(model):
    """Fraction of exactly-zero weights in the prunable tensors: one ruler for every method."""
    weights = [local(p) for p in model.parameters() if prunable(p, {})]  # each rank's shards (or replica)
    zeros = sum((w == 0).sum() for w in weights)
    zeros, n = over_ranks([zeros, sum(w.numel() for w in weights)], weights[0].device)
    return zeros / n


def train(config):
    """Train one configuration end to end (or on from its checkpoint); returns the results dict,
    which is also written to <out>/results.json. A `--compare` runs this once per configuration."""
    # 1) the data, model, optimizer and pruning method, seeded; on from the checkpoint with --resume
    state, train_data, test_data = setup(config)
    rank = rank_and_world()[0]
    os.makedirs(config["out"], exist_ok=True)
    name = f"checkpoint.rank{rank}.pt" if config["fsdp"] and rank else "checkpoint.pt"
    path = os.path.join(config["out"], name)
    if config["resume"]:
        resume(state, path)
    for epoch in range(state.epoch + 1, config["epochs"] + 1):
        # 2) an epoch of training, then the test set
        start = time.perf_counter()
        train_loss, train_accuracy = train_epoch(state, train_data, epoch)
        test_loss, test_accuracy = evaluate(state.model, test_data, config)
        epoch_seconds = time.perf_counter() - start
        # 3) its line, its history, and a checkpoint
        state.wall_seconds += epoch_seconds
        state.epoch, sparsity = epoch, prunable_sparsity(state.model)
        held_out = metric(config)["key"].split("_")[0]  # "test", or the GPT's "val"
        state.history.append({"epoch": epoch, "step": state.step, "train_loss": train_loss,
                              "train_accuracy": train_accuracy, f"{held_out}_loss": test_loss,
                              f"{held_out}_accuracy": test_accuracy, "sparsity": sparsity,
                              "epoch_seconds": epoch_seconds})
        if held_out == "val":  # the GPT: perplexity, exp(loss per character)
            state.history[-1]["val_perplexity"] = math.exp(min(test_loss, 700))
        print("\r\x1b[K" if sys.stdout.isatty() else "", end="")  # clear the progress line
        print(f"epoch {epoch}/{config['epochs']} (step {state.step}) train loss {train_loss:.4f} acc "
              f"{train_accuracy:5.2f}% | {held_out} loss {test_loss:.4f} acc {test_accuracy:5.2f}% | "
              f"sparsity {sparsity:6.2%} | {epoch_seconds:.1f} s", flush=True)
        if rank == 0 or config["fsdp"]:
            save_checkpoint(state, path)
    # 4) results.json and the pruned model
    return write_results(state)


def metric(config):
    """The figure a run is judged by, as results.json names it: {key (in history and final), label,
    higher_is_better}; the key names the held-out split: "test", or nanoGPT's "val" for the GPT."""
    if config["model"] == "gpt":
        return {"key": "val_loss", "label": "validation loss (nats per character)", "higher_is_better": False}
    return plot.ACCURACY


# --- several processes: torchrun, DDP, FSDP2 ---
# Under torchrun every rank takes its slice of each batch, and calls what follows at the same points.
def rank_and_world():
    """(this process's rank, the number of processes), from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_processes(config):
    """Join torchrun's processes, if several: gloo on the CPU, nccl on CUDA (then "cuda" is the local
    rank's GPU)."""
    if rank_and_world()[1] > 1:
        cuda = torch.device(config["device"]).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")


def wrapped(model, config):
    """The model to train: itself in one process, else a DDP replica or FSDP2 shards (each block, then
    the root)."""
    if rank_and_world()[1] == 1:
        return model
    if not config["fsdp"]:
        return torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)  # in buckets
    mesh = dist.init_device_mesh(torch.device(config["device"]).type, (rank_and_world()[1],))  # run's device
    blocks = model.stages if config["model"] == "resnet18" else model.children()  # BasicBlocks; layers
    for block in model.blocks if config["model"] == "gpt" else blocks:  # the GPT's transformer blocks
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def over_ranks(numbers, device, op=dist.ReduceOp.SUM):
    """`numbers` (floats or 0-d tensors) summed over the processes (or reduced by `op`), as floats."""
    values = torch.stack([torch.as_tensor(number, dtype=torch.float64, device=device) for number in numbers])
    if dist.is_initialized():
        dist.all_reduce(values, op=op)
    return values.tolist()


# --- the data sets on disk: IDX files, torchvision's downloads, the text ---
IDX_FILES = [f"{s}-{kind}-ubyte" for s in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def read_idx(path):
    """An IDX file (the MNIST format; gzipped or not) as a uint8 tensor of its shape; RunError if damaged."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except Exception as error:  # gzip raises OSError, EOFError or zlib.error on a damaged or cut stream
        raise RunError(f"{path} cannot be read ({error}): re-copy the data set") from None
    if data[:3] != b"\x00\x00\x08" or len(data) < 4:  # magic: two zero bytes, type 0x08 (uint8), dims
        raise RunError(f"{path} is not an IDX file of uint8 values: re-copy the data set")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if (found := len(data) - 4 - 4 * ndim) != math.prod(shape):  # one byte per value after the header
        raise RunError(f"{path} is cut short or damaged (header {shape}, {max(found, 0)} values): "
                       "re-copy the data set")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def torchvision_download(name, data_dir):
    """The data set through its torchvision class, downloaded into data_dir when missing."""
    import torchvision
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision)
    splits = []
    for train in (True, False):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dataset = cls(data_dir, train=train, download=True)  # quiet; once there, it downloads nothing
        images = torch.as_tensor(dataset.data)
        images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images.unsqueeze(1)  # (N, C, H, W)
        splits += [images.contiguous(), torch.as_tensor(dataset.targets)]
    return splits


def load_dataset(name, data_dir):
    """[train_images, train_labels, test_images, test_labels]: uint8 (N, C, H, W) and labels, on the CPU.
    MNIST and Fashion-MNIST are read from IDX files where found (torchvision's layout under data_dir,
    data_dir, Debian's /usr/share/datasets); else torchvision downloads the data set into data_dir."""
    torchvision_layout = os.path.join(data_dir, DATASETS[name].torchvision, "raw")
    tried = [d for d in (torchvision_layout, data_dir, SYSTEM_DATA_DIRS.get(name)) if d and name != "cifar10"]
    for directory in tried:
        paths = [next((p for p in (path, path + ".gz") if os.path.exists(p)), None)  # plain or gzipped
                 for path in (os.path.join(directory, file) for file in IDX_FILES)]
        if all(paths):  # images (N, H, W) become (N, C, H, W)
            return [array.unsqueeze(1) if array.dim() == 3 else array for array in map(read_idx, paths)]
    try:
        return torchvision_download(name, data_dir)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ... when offline
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]  # torchvision's last word
        apt = (" or `apt-get install dataset-fashion-mnist`," if name == "fashion-mnist" else
               " or use --dataset fashion-mnist, which Debian's dataset-fashion-mnist provides offline,")
        raise RunError(f"could not load {name}: looked in {', '.join(tried) or data_dir}, then tried to "
                       f"download it into {data_dir} ({reason}). To fix: point --data-dir DIR at a copy "
                       f"of the files,{apt} or run once with network access to download it.") from None


def load_text(name, data_dir):
    """(the text's characters as int64 token ids, its vocabulary: the sorted characters). Read from data_dir;
    when the file is missing, downloaded there first. Either way it must match its sha256."""
    file, url, sha256 = TEXTS[name]
    path = os.path.join(data_dir, file)
    if not os.path.exists(path):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except Exception as error:  # URLError, OSError, timeouts, ... when offline
            raise RunError(f"could not load {name}: {path} is missing, and downloading it from {url} failed "
                           f"({error}). To fix: copy the file there (or point --data-dir DIR at a folder "
                           f"holding {file}), or run once with network access to download it") from None
        if hashlib.sha256(data).hexdigest() == sha256:  # a failed download writes nothing
            os.makedirs(data_dir, exist_ok=True)
            plot.write_atomic(path, lambda f: f.write(data), binary=True)
    else:
        with open(path, "rb") as f:
            data = f.read()
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:  # never written over: the user's file
        raise RunError(f"{path if os.path.exists(path) else url} is not the expected {name} text (sha256 "
                       f"{digest[:16]}..., not {sha256[:16]}...): replace it with the file from {url}")
    vocabulary = sorted(set(data))  # Tiny Shakespeare: 65 ASCII characters, so one byte is one character
    ids = torch.zeros(256, dtype=torch.int64)
    ids[vocabulary] = torch.arange(len(vocabulary))
    return ids[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()], bytes(vocabulary).decode()


# --- a run: its set-up (optimizer, schedule), checkpoints and results ---
def make_optimizer(config, model, total_steps):
    """(optimizer, lr scheduler or None, pruning method or None) for the config. The GPT: nanoGPT's two
    parameter groups (weight decay on the 2-D tensors only), its betas and its warmup-cosine schedule."""
    name, lr, params = config["optimizer"], config["lr"], list(model.parameters())
    gpt = config["model"] == "gpt"
    weight_decay = GPT_WEIGHT_DECAY if gpt and name not in ("sgd", "adam") else OPTIMIZERS[name][1]
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}] if gpt else params
    adam = dict(lr=lr, weight_decay=weight_decay, **({"betas": GPT_BETAS} if gpt else {}))
    scheduler = pruning = None
    replicas = dist.group.WORLD if dist.is_initialized() and not config["fsdp"] else None  # DDP: checked
    schedule = {key: config[key] for key in ("prune_start", "prune_end", "prune_every")}
    if name == "sgd":  # Robbins & Monro 1951, with heavy-ball momentum (Polyak 1964)
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif name == "adam":  # Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization" (arXiv:1412.6980)
        optimizer = torch.optim.Adam(groups, **adam)
    elif name == "adamw":  # Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (1711.05101)
        optimizer = torch.optim.AdamW(groups, **adam)
    elif name == "adamwadv":  # AdamW + AMSGrad (Reddi et al. 2018, "On the Convergence of Adam and Beyond")
        optimizer = torch.optim.AdamW(groups, **adam, amsgrad=True)
    elif name == "adamwspam":
        optimizer = AdamWSPAM(groups, **adam)
    else:
        optimizer = AdamWPrune(groups, **adam, sparsity=config["sparsity"], schedule=SCHEDULE,
                               importance=config["importance"], check_replicas=replicas, **schedule)
    if config["lr_schedule"] == "warmup-cosine":  # each scheduler is stepped once per optimizer step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: warmup_cosine(t, total_steps))
    elif config["lr_schedule"] == "cosine" or name == "adamwadv":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config["pruning"] in ("magnitude", "movement"):
        method = MagnitudePruning if config["pruning"] == "magnitude" else MovementPruning
        pruning = method(params, config["sparsity"], check_replicas=replicas, **schedule)
    return optimizer, scheduler, pruning


def warmup_cosine(t, total_steps):
    """nanoGPT's learning-rate factor at step t (from 0): linear warm-up, then a cosine to MIN_LR_FRACTION."""
    if t < WARMUP_STEPS:
        return (t + 1) / (WARMUP_STEPS + 1)
    progress = min(1.0, (t - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * (1 + math.cos(math.pi * progress)) / 2


class TrainingState:
    """What changes while training, and so goes into a checkpoint."""

    def __init__(self, config, model, optimizer, scheduler, pruning, monitor):
        self.config, self.model, self.optimizer, self.scheduler = config, model, optimizer, scheduler
        self.pruning, self.monitor = pruning, monitor  # monitor.every: steps between samples
        self.generator = torch.Generator().manual_seed(config["seed"])  # data order and augmentation
        self.step, self.epoch, self.wall_seconds = 0, 0, 0.0
        self.history, self.sparsity_timeline = [], []

    def state_dict(self):
        return {
            "config": self.config, "epoch": self.epoch, "step": self.step, "wall_seconds": self.wall_seconds,
            "history": self.history, "sparsity_timeline": self.sparsity_timeline,
            "memory_timeline": self.monitor.timeline, "world_size": rank_and_world()[1],
            "model": getattr(self.model, "module", self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "pruning": self.pruning.state_dict() if self.pruning else None,
            "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if "cuda" in self.config["device"] else []},
        }

    def read_checkpoint(self, path):
        """(the dict in a checkpoint file, None), or ({}, what is wrong with the file: a line that
        names it)."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # on a damaged file: UnpicklingError, RuntimeError, EOFError, even KeyError
            return {}, f"{path} cannot be read (cut short, damaged, or no PyTorch file)"
        absent = [key for key in self.state_dict() if not isinstance(saved, dict) or key not in saved]
        if absent:
            return {}, f"{path} is no train.py checkpoint: it lacks {', '.join(absent)}"
        return saved, None

    def load_state_dict(self, state):
        ignored = ("resume", "sparsities", "out")  # sparsities repeats --sparsity; the folder may have moved
        if differences := config_differences(state["config"], self.config, ignored):
            raise RunError(f"--resume: the checkpoint was made with other settings ({differences}); "
                           "resume with the same flags, or start afresh with another --out")
        self.epoch, self.step, self.wall_seconds = state["epoch"], state["step"], state["wall_seconds"]
        self.history, self.sparsity_timeline = state["history"], state["sparsity_timeline"]
        self.monitor.timeline = state["memory_timeline"]
        getattr(self.model, "module", self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.pruning:
            self.pruning.load_state_dict(state["pruning"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def save_checkpoint(state, path):
    plot.write_atomic(path, lambda f: torch.save(state.state_dict(), f), binary=True)


def setup(config):
    """(TrainingState, train data, test data) for a config, seeded."""
    device = torch.device(config["device"])
    train_data, test_data = load_data(config, device)
    torch.manual_seed(config["seed"])
    model = wrapped(make_model(config, device), config)
    total_steps = config["epochs"] * steps_per_epoch(config)
    optimizer, scheduler, pruning = make_optimizer(config, model, total_steps)
    monitor = memory.MemoryMonitor(device, every=max(1, total_steps // TIMELINE_SAMPLES))
    return TrainingState(config, model, optimizer, scheduler, pruning, monitor), train_data, test_data


def resume(state, path):
    """The run's checkpoint into `state` (FSDP2: each rank its shards; all check they hold one run)."""
    (rank, ranks), device = rank_and_world(), torch.device(state.config["device"])
    saved, damage = state.read_checkpoint(path) if os.path.exists(path) else ({}, None)  # none: fewer ranks
    epoch, made_by, bad = saved.get("epoch", -1), saved.get("world_size", 1), (rank + 1) * bool(damage)
    first, last, made_by, bad = map(int, over_ranks([-epoch, epoch, made_by, bad], device, dist.ReduceOp.MAX))
    if bad:  # 1 + the highest rank with a damaged file: all stop, rank 0 naming its own file or that rank's
        raise RunError(f"--resume: {damage or f'rank {bad - 1} cannot read checkpoint.rank{bad - 1}.pt'}: "
                       "delete it and start afresh without --resume, or pass another --out")
    if made_by != ranks:
        raise RunError(f"--resume: the checkpoint was made by {made_by} process(es), this run has {ranks}: "
                       f"resume with as many, e.g. torchrun --nproc-per-node {made_by} train.py and the same "
                       "flags")
    if -first != last:  # a stop while they were written
        raise RunError(f"--resume: the ranks' checkpoints end at epochs {-first} to {last}: "
                       "start in another --out")
    state.load_state_dict(saved)
    print(f"resumed from {path} after epoch {state.epoch}")


def write_results(state):
    """The results of a finished run: written to <out>/results.json, with model.pruned.pt beside them."""
    config, (rank, ranks), device = state.config, rank_and_world(), torch.device(state.config["device"])
    report = state.monitor.report()
    if ranks > 1:  # figures per rank: the largest over ranks
        keys = [key for key in ("peak_bytes", "mean_bytes", "process_peak_rss_bytes", "peak_reserved_bytes")
                if report[key] is not None]  # peak reserved: CUDA only
        largest = over_ranks([report[key] for key in keys], device, dist.ReduceOp.MAX)
        report.update(zip(keys, map(round, largest)),
                      per_rank=f"{', '.join(keys)}: the largest of {ranks} ranks; timeline: rank 0's")
    key = metric(config)["key"]
    results = {
        "config": config, "history": state.history, "sparsity_timeline": state.sparsity_timeline,
        "metric": metric(config), "memory": report,
        "wall_seconds": state.wall_seconds,  # training and evaluation, summed over epochs (no data loading)
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": importlib.util.find_spec("torchvision")
            and importlib.metadata.version("torchvision"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
            "world_size": ranks, "backend": dist.get_backend() if ranks > 1 else None,
            "sharded": config["fsdp"]},
        "final": {key: state.history[-1][key], "sparsity": prunable_sparsity(state.model),
                  "peak_memory_bytes": report["peak_bytes"],
                  "peak_reserved_bytes": report["peak_reserved_bytes"],
                  "wall_seconds": state.wall_seconds},  # peak reserved: CUDA only (None on the CPU)
    }
    if key == "val_loss":
        results["final"]["val_perplexity"] = state.history[-1]["val_perplexity"]
    if config["pruning"] != "none":  # the pruned model, smaller on disk (FSDP2: gathered, on every rank)
        weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                   for k, v in getattr(state.model, "module", state.model).state_dict().items()}
        path = os.path.join(config["out"], "model.pruned.pt")
        if rank == 0:
            plot.write_atomic(path, lambda f: torch.save(compact_state_dict(weights), f), binary=True)
            results["final"].update(pruned_file_bytes=os.path.getsize(path),
                                    dense_file_bytes=memory.saved_bytes(weights))
    if rank == 0:
        plot.write_atomic(os.path.join(config["out"], "results.json"),
                          lambda f: f.write(plot.finite_json(results)))
    if ranks > 1:
        dist.barrier()  # the others wait for the one writer
    return results


BEFORE_FLAG = {"fsdp": False, "lr_schedule": "constant"}  # what train.py did before these settings existed


def config_differences(old, new, ignored=()):
    """The settings in which two configs differ, as flags: '--lr 0.001 there, 0.01 now, ...'. A setting
    that an older train.py's config lacks counts as what that version did (BEFORE_FLAG)."""
    old = {**BEFORE_FLAG, **old}
    show = lambda value: "unset" if value is None else value
    return ", ".join(f"--{key.replace('_', '-')} {show(old.get(key))} there, {show(new[key])} now"
                     for key in new if key not in ignored and old.get(key) != new[key])


# --- the comparison ---
STUDY = [  # (row name, optimizer, pruning, importance): the original study's rows, then two references
    ("SGD + movement", "sgd", "movement", None),
    ("Adam + movement", "adam", "movement", None),
    ("AdamW + movement", "adamw", "movement", None),
    ("AdamWAdv + movement", "adamwadv", "movement", None),
    ("AdamW-SPAM + movement", "adamwspam", "movement", None),
    ("AdamWPrune + state", "adamwprune", "state", None),
    ("AdamW (dense)", "adamw", "none", None),
    ("AdamW + magnitude", "adamw", "magnitude", None),
]
ABLATION = [(f"AdamWPrune, {name}", "adamwprune", "state", name) for name in IMPORTANCES] + [
    ("AdamW (dense)", "adamw", "none", None)]


def comparison_runs(config):
    """(row name, config) of each run of a comparison: every row at every sparsity, the dense
    reference once, all on the same seed, data and pruning schedule."""
    runs = []
    for sparsity in config["sparsities"]:
        for name, optimizer, pruning, importance in ABLATION if config["ablation"] else STUDY:
            if pruning == "none" and sparsity != config["sparsities"][0]:
                continue
            row_sparsity = sparsity if pruning != "none" else 0.0
            tag = f"-{importance}" if config["ablation"] and importance else ""
            folder = f"{config['model']}-{optimizer}-{pruning}{tag}-{row_sparsity:g}"
            out = os.path.join(config["out"], folder)
            row = {k: v for k, v in config.items() if k not in ("compare", "ablation", "plot", "sparsities")}
            runs.append((name, {**row, "optimizer": optimizer, "pruning": pruning, "sparsity": row_sparsity,
                                "importance": importance or config["importance"],
                                "lr": OPTIMIZERS[optimizer][2 if config["model"] == "gpt" else 0],
                                "out": out, "resume": False}))
    return runs


def finished_results(config):
    """The results of a finished run of exactly this config, or None."""
    path = os.path.join(config["out"], "results.json")
    ignored = ("resume", "out", "importance" if config["pruning"] != "state" else "")
    results = plot.read_results(path)  # (importance: only in state)
    if results and (differences := config_differences(results["config"], config, ignored)):
        raise RunError(f"{path} was made with other settings ({differences}): "
                       f"give the comparison another --out, or delete that directory")
    return results


def compare(config):
    """Run (or resume) every row, then write and print the table and plots; a damaged saved result
    stops it first."""
    out, rows = config["out"], []
    os.makedirs(out, exist_ok=True)
    runs = [(name, row, finished_results(row)) for name, row in comparison_runs(config)]  # all read first
    for name, row_config, results in runs:
        resuming = os.path.exists(os.path.join(row_config["out"], "checkpoint.pt"))
        doing = "done before, in" if results else "resuming in" if resuming else "running in"
        print(f"--- {name}, sparsity {row_config['sparsity']:.0%}: {doing} {row_config['out']}", flush=True)
        results = results or train({**row_config, "resume": resuming})
        rows.append(plot.comparison_row(name, row_config, results, out))
        if rank_and_world()[0] == 0:  # one writer
            plot.write_comparison(out, config, rows, results["environment"], plot.metric_of(results))
    if rank_and_world()[0] > 0:
        return rows
    paths = plot.render_svgs(out) if config["plot"] != "text" else []
    comparison = plot.load_comparison(out)[0]
    table = plot.table_lines(comparison["rows"], plot.LABEL_COLUMNS, plot.metric_of(comparison))
    print(plot.text_report(out) if config["plot"] != "svg" else "\n".join(table))  # text plots end with it
    print(f"comparison: {os.path.join(out, 'comparison.json')}, .csv and {len(paths)} SVG plots in {out}")
    return rows


# --- the command line: flags, their defaults and the clashes between them ---
def checked(convert, ok, rule):
    """An argparse type: convert(text), kept when ok(value); otherwise argparse stops, quoting `rule`."""
    def parse(text):
        with contextlib.suppress(ValueError, RuntimeError):
            if ok(value := convert(text)):
                return value
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return parse


COUNT = checked(int, lambda n: n >= 1, "takes a whole number of at least 1")
POSITIVE = checked(float, lambda x: 0 < x < math.inf, "takes a positive number (not inf or nan)")
SPARSITIES = checked(lambda text: [float(s) for s in text.split(",")], lambda ss: all(0 <= s < 1 for s in ss),
                     "takes a number in [0, 1), or a list like 0.5,0.7,0.9 with --compare")
DEVICE = checked(str, lambda text: text == "auto" or torch.device(text), "takes auto, cpu, cuda or cuda:N")


class CommandLine(argparse.ArgumentParser):
    """Under torchrun every process reads the command line; only rank 0 prints help or an error."""

    def print_usage(self, file=None):
        if rank_and_world()[0] == 0:
            super().print_usage(file)

    def print_help(self, file=None):
        if rank_and_world()[0] == 0:
            super().print_help(file)

    def exit(self, status=0, message=None):
        if status and rank_and_world()[0] != 0:
            time.sleep(1)  # torchrun stops every process once one fails: rank 0, which says why, goes first
            message = None
        super().exit(status, message)


def parse_args(argv=None, writes=True):
    """The command line as a config dict, every default resolved; bad input stops here. writes=False: for
    callers that write nothing to --out (memory.py's benchmarks), a run already there is no reason to stop."""
    p = CommandLine(description="Train while pruning: AdamWPrune against baselines.")
    add, per_model = p.add_argument, lambda defaults: ", ".join(f"{v} for {k}" for k, v in defaults.items())
    add("--model", choices=tuple(DEFAULT_DATASET), default="lenet5", help="network (default: lenet5)")
    add("--dataset", choices=(*DATASETS, *TEXTS), help=f"data set (default: {per_model(DEFAULT_DATASET)})")
    add("--optimizer", choices=tuple(OPTIMIZERS), default="adamwprune", help="(default: adamwprune)")
    add("--pruning", choices=PRUNINGS, help="pruning method, state being AdamWPrune's own "
        "(default: state for adamwprune, none otherwise)")
    add("--sparsity", type=SPARSITIES, metavar="S", help="final fraction of prunable weights (2+ dims) "
        "pruned, in [0, 1); with --compare a list such as 0.5,0.7,0.9 sweeps "
        f"(default when pruning: {per_model(DEFAULT_SPARSITY)}; else 0)")
    add("--importance", choices=IMPORTANCES,
        help=f"AdamWPrune's importance score (default: {DEFAULT_IMPORTANCE})")
    add("--epochs", type=COUNT, metavar="N", help="epochs to train; the GPT's epoch is 250 optimizer steps "
        f"(default: {per_model(DEFAULT_EPOCHS)})")
    add("--batch-size", type=COUNT, metavar="N", help="global batch size: images, or the GPT's windows of 64 "
        f"characters (default: {per_model(BATCH_SIZE)})")
    add("--lr", type=POSITIVE, metavar="LR", help="learning rate (default: per optimizer: "
        + ", ".join(f"{name} {lr:g}" for name, (lr, _, _) in OPTIMIZERS.items()) + "; for the GPT: "
        + ", ".join(f"{name} {lr:g}" for name, (_, _, lr) in OPTIMIZERS.items()) + ")")
    add("--lr-schedule", choices=("constant", "cosine", "warmup-cosine"), help="learning rate over the run: "
        "constant, cosine annealing to 0 at the last step, or nanoGPT's 100 warm-up steps and cosine to "
        "lr / 10; "
        f"adamwadv is cosine where constant is asked (default: {per_model(DEFAULT_LR_SCHEDULE)})")
    add("--prune-start", type=int, metavar="STEP", help="optimizer step where pruning starts "
        f"(default: {PRUNE_START_FRACTION * 100:.0f}%% of all steps)")
    add("--prune-end", type=int, metavar="STEP", help="optimizer step where the final sparsity is reached "
        f"(default: {PRUNE_END_FRACTION * 100:.0f}%% of all steps)")
    add("--prune-every", type=COUNT, metavar="STEPS",
        help=f"optimizer steps between mask updates (default: 1/{PRUNE_UPDATES_PER_EPOCH} of an epoch)")
    add("--seed", type=int, default=1, metavar="S", help="random seed (default: 1)")
    add("--device", type=DEVICE, default="auto",
        help="cpu, cuda or cuda:N (default: auto: cuda if any, else cpu)")
    add("--fsdp", action="store_true", help="under torchrun: shard the model over the processes with FSDP2")
    add("--amp", choices=("none", "bf16"), default="none",
        help="CUDA only: bf16 autocast, and channels_last for resnet18 (default: none)")
    add("--data-dir", default="./data", metavar="DIR",
        help="where data sets are read or downloaded (default: ./data)")
    add("--out", metavar="DIR", help="where results.json and checkpoint.pt go; a run there is continued with "
        "--resume, never overwritten (default: results/<model>-<optimizer>-<pruning>-<sparsity>)")
    add("--resume", action="store_true", help="continue the run in --out (same flags as the stopped run)")
    add("--limit", type=COUNT, metavar="N", help="use only the first N images of each split; the GPT: N "
        "windows per epoch and at most N validation windows (default: all)")
    add("--compare", action="store_true", help="run every optimizer/pruning pairing of the study on one seed "
        "and schedule, write comparison.json, .csv and SVG plots to --out "
        "(default: results/compare-<model>-<dataset>)")
    add("--ablation", action="store_true",
        help="with --compare: AdamWPrune with each importance score instead of the study's rows")
    add("--plot", choices=("svg", "text", "both"), default="svg", help="with --compare, as plot.py's --plot: "
        "svg writes the SVG plots and prints the table, text prints the text plots, both does both "
        "(default: svg)")
    add("--dry-run", action="store_true", help=f"one quick pass: 1 epoch of {DRY_RUN_BATCHES} batches, in "
        "the default folder with -dry-run added, which the next dry run overwrites (default: off)")
    args = p.parse_args(argv)
    given = {f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v != p.get_default(k)}

    # 1) every default, some following from other flags
    adamwprune, compare = args.optimizer == "adamwprune", args.compare
    args.pruning = args.pruning or ("state" if adamwprune else "none")
    pruning = args.pruning != "none"
    args.sparsities = args.sparsity or [DEFAULT_SPARSITY[args.model] if pruning else 0.0]  # several: a sweep
    args.sparsity = args.sparsities[0]
    args.importance = args.importance or DEFAULT_IMPORTANCE
    args.dataset = args.dataset or DEFAULT_DATASET[args.model]
    args.batch_size = args.batch_size or BATCH_SIZE[args.model]
    if (args.dataset in TEXTS) != (args.model == "gpt"):  # the data's length sets the schedule's: first
        p.error(f"--model {args.model} does not take --dataset {args.dataset}: the GPT reads text "
                f"({', '.join(TEXTS)}), the image models images ({', '.join(DATASETS)})")
    args.epochs = args.epochs or DEFAULT_EPOCHS[args.model]
    args.lr = args.lr or OPTIMIZERS[args.optimizer][2 if args.model == "gpt" else 0]
    args.lr_schedule = args.lr_schedule or DEFAULT_LR_SCHEDULE[args.model]
    if args.dry_run:
        args.epochs, args.limit = 1, min(args.limit or math.inf, DRY_RUN_BATCHES * args.batch_size)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    epoch_steps = steps_per_epoch(vars(args))
    total_steps = args.epochs * epoch_steps
    if args.prune_start is None:  # the pruning schedule, in optimizer steps
        args.prune_start = round(PRUNE_START_FRACTION * total_steps)
    if args.prune_end is None:
        args.prune_end = max(args.prune_start, round(PRUNE_END_FRACTION * total_steps))
    args.prune_every = args.prune_every or max(1, epoch_steps // PRUNE_UPDATES_PER_EPOCH)
    folder = (f"{'ablation' if args.ablation else 'compare'}-{args.model}-{args.dataset}" if compare
              else f"{args.model}-{args.optimizer}-{args.pruning}-{args.sparsity:g}")
    args.out = args.out or os.path.join("results", folder + ("-dry-run" if args.dry_run else ""))
    found = [name for name in ("checkpoint.pt", "results.json")
             if os.path.exists(os.path.join(args.out, name))]

    # 2) flags that do not fit together: the first clash stops here, saying how to fix it
    compare_drops = sorted(given & {"--optimizer", "--pruning", "--lr", "--resume"})
    schedule_flags = sorted(given & {"--prune-start", "--prune-end", "--prune-every"})
    cuda, world = torch.device(args.device).type == "cuda", rank_and_world()[1]
    clashes = [
        (compare and compare_drops, "--compare runs every optimizer and pruning method with its default "
                                    f"learning rate and resumes by itself: drop {', '.join(compare_drops)}"),
        (not compare and given & {"--ablation", "--plot"},
         "--ablation and --plot shape a comparison: add --compare"),
        (compare and 0 in args.sparsities, "--sparsity must be in (0, 1) for a comparison, got 0"),
        (not compare and len(args.sparsities) > 1, "several --sparsity values make a sweep: add --compare"),
        (args.pruning == "state" and not adamwprune, "--pruning state ranks weights by AdamWPrune's own "
         f"moments: use --optimizer adamwprune, or prune {args.optimizer} with --pruning magnitude or "
         "movement"),
        (adamwprune and args.pruning not in ("state", "none"), "--optimizer adamwprune prunes by itself: use "
         f"--pruning state (or none for a dense run); --pruning {args.pruning} is for the other optimizers"),
        ("--importance" in given and args.pruning != "state",
         "--importance picks AdamWPrune's score: it needs --optimizer adamwprune --pruning state"),
        (not pruning and args.sparsity > 0, "--sparsity needs a pruning method: add --pruning magnitude or "
                                            "movement (or use --optimizer adamwprune)"),
        (not pruning and schedule_flags, f"{', '.join(schedule_flags)} set a pruning schedule: add --pruning "
                                         "(or use --optimizer adamwprune)"),
        (cuda and not torch.cuda.is_available(), f"--device {args.device}: no CUDA here; use --device cpu"),
        (args.amp == "bf16" and not cuda,
         "--amp bf16 runs on CUDA only: use --device cuda, or --amp none on the CPU"),
        (not 0 <= args.prune_start <= args.prune_end <= total_steps,
         f"need 0 <= --prune-start ({args.prune_start}) <= --prune-end ({args.prune_end}) <= the run's "
         f"{total_steps} optimizer steps ({args.epochs} epochs x {epoch_steps})"),
        (args.batch_size % world, "--batch-size is the global batch, split evenly over the "
         f"{world} processes: use a multiple of {world}, such as "
         f"{max(world, args.batch_size // world * world)}"),
        (args.fsdp and world == 1,
         "--fsdp needs several processes: torchrun --nproc-per-node 2 train.py --fsdp"),
        (args.resume and "checkpoint.pt" not in found,
         f"--resume: no checkpoint in {args.out}; run without --resume to start"),
        (writes and found and not (args.resume or compare or (args.dry_run and "--out" not in given)),
         f"{args.out} holds a run already ({' and '.join(found)}): add --resume to continue it, "
         "pass another --out, or delete that folder"),
    ]
    for clash, message in clashes:
        if clash:
            p.error(message)
    return vars(args)


def main(argv=None):
    config, rank = parse_args(argv), rank_and_world()[0]
    join_processes(config)
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    again = "run the same command again" if config["compare"] else "add --resume to the same command"
    try:
        one_run = plot.claimed(config["out"]) if rank == 0 else contextlib.nullcontext()  # process 0 holds it
        with one_run, contextlib.redirect_stdout(open(os.devnull, "w") if rank else sys.stdout):  # one writer
            if config["compare"]:
                return compare(config)
            final = train(config)["final"]
            judged_by = metric(config)
            key = judged_by["key"]
            figure = f"{final[key]:.2f}%" if key == "test_accuracy" else f"{final[key]:.4f}"
            reserved = final["peak_reserved_bytes"]
            reserved = reserved and f" ({memory.format_bytes(reserved)} reserved)"
            print(f"{config['model']} {config['dataset']} {config['optimizer']}/{config['pruning']}: "
                  f"{plot.title_of(judged_by).lower()} {figure}, sparsity {final['sparsity']:.1%}, "
                  "peak memory "
                  f"{memory.format_bytes(final['peak_memory_bytes'])}{reserved or ''}"
                  f"{' per rank' if rank_and_world()[1] > 1 else ''}, "
                  f"{final['wall_seconds']:.1f} s -> {os.path.join(config['out'], 'results.json')}"
                  + (f"; model.pruned.pt {final['pruned_file_bytes'] / final['dense_file_bytes']:.2f}x the "
                     "dense state_dict" if "pruned_file_bytes" in final else ""))
    except (RunError, plot.PlotInputError, plot.FolderError) as error:  # PlotInputError: a bad results.json
        sys.exit(f"error: {error}" if rank == 0 else 1)
    except plot.WriteError as error:  # a full disk, say: the file that was there stays
        sys.exit(f"error: {error}; the earlier files in {config['out']} are intact: make room, then {again} "
                 "to continue" if rank == 0 else 1)
    except KeyboardInterrupt:
        saved = config["compare"] or os.path.isdir(config["out"]) and any(
            name.startswith("checkpoint") and name.endswith(".pt") for name in os.listdir(config["out"]))
        stopped = (f"\nstopped: finished epochs are saved in {config['out']}; {again} to continue" if saved
                   else f"\nstopped before the first epoch was saved: nothing in {config['out']} to "
                   "resume; run the same command to start")
        sys.exit(stopped if rank == 0 else 1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
