"""Tests: each one a behaviour, checked against an independent reference where there is one.

    $ python -m pytest -q

Grouped by the file under test (`# === file ===`), in sections (`# --- ... ---`): adamwprune.py,
memory.py, models.py, train.py, plot.py, .ci/gpu.
"""
import ast
import copy
import gzip
import io
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memory
import plot
import train
from adamwprune import (AdamWPrune, compact_state_dict, dense_state_dict, importance_score, local, lowest_k,
                        mask_update_due, scheduled_sparsity)
from adamwprune import prunable as prunable_rule
from models import GPT, GPT_SHAPES, LeNet5, ResNet18

HERE = os.path.dirname(os.path.abspath(__file__))

# --- helpers ---

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (.ci/gpu runs these on one)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]  # "cuda" in a test id: `.ci/gpu --smoke` selects it


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def small_conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def random_grads(params, step, scale=1.0):
    """The same gradients for the same step, whatever the run."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype).contiguous(
            memory_format=torch.channels_last if p.dim() == 4 and not p.is_contiguous() else torch.contiguous_format)


def prunable(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def zeros_fraction(params):
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


def cubic(t, s, start, end):
    """The cubic schedule of Zhu & Gupta (2017), written out again independently of adamwprune.py."""
    if t < start:
        return 0.0
    if t >= end:
        return s
    return s * (1 - (1 - (t - start) / (end - start)) ** 3)

# === adamwprune.py ===

# --- 1. with sparsity 0 it is AdamW, and a drop-in for it ---


def max_difference_after(steps, ours, opt, ref, ref_opt, before_step=None, after_step=None):
    """Feed both optimizers the same gradients for `steps` steps; the largest parameter difference."""
    for t in range(steps):
        for model in (ours, ref):
            random_grads(model.parameters(), t)
            if before_step:
                before_step(model, t)
        opt.step()
        ref_opt.step()
        if after_step:
            after_step()
    return max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))


def two_groups(model, **options):
    p = list(model.parameters())
    return [{"params": p[:2], "lr": 1e-2, "weight_decay": 0.0, **options},
            {"params": p[2:], "lr": 1e-3, "weight_decay": 0.05, **options}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"maximize": True}, {"foreach": True},
                                     {"fused": True}, {"foreach": False, "fused": False}],
                         ids=["default", "amsgrad", "maximize", "foreach", "fused", "for-loop"])
def test_equals_adamw_when_sparsity_is_zero(options, device):
    ours, ref = small_net().to(device), small_net().to(device)
    opt = AdamWPrune(two_groups(ours), sparsity=0.0, betas=(0.8, 0.99), eps=1e-6, **options)
    ref_opt = torch.optim.AdamW(two_groups(ref), betas=(0.8, 0.99), eps=1e-6, **options)
    assert max_difference_after(100, ours, opt, ref, ref_opt) <= 1e-6


def test_parameters_without_gradient_on_some_steps_are_skipped_like_adamw():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), sparsity=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters())

    def drop_a_gradient(model, t):
        if t % 3 == 0:
            model[0].weight.grad = None  # e.g. a branch not taken on this step
    assert max_difference_after(40, ours, opt, ref, ref_opt, before_step=drop_a_gradient) <= 1e-6


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "fused": True}, {"foreach": True}],
                         ids=["default", "amsgrad-fused", "foreach"])
def test_loads_adamw_state_dict_and_continues_like_adamw(options):
    model, ref = small_net(), small_net()
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, **options)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, **options)
    max_difference_after(10, model, adamw, ref, ref_opt)
    opt = AdamWPrune(model.parameters(), sparsity=0.0)  # a user switching optimizers mid-run
    opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["optimizer_step"] == 10
    assert max_difference_after(20, model, opt, ref, ref_opt) <= 1e-6


def test_an_older_state_dict_without_new_group_keys_loads_with_defaults():
    model = small_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=2, prune_end=4, prune_every=1)
    for t in range(3):
        random_grads(model.parameters(), t)
        opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:  # as saved before these keys existed
        for key in ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable", "schedule"):
            del group[key]
    for state in saved["state"].values():
        state["step"] = int(state["step"])  # older versions kept an int
    loaded = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=2, prune_end=4, prune_every=1)
    loaded.load_state_dict(saved)
    group = loaded.param_groups[0]
    assert group["amsgrad"] is False and group["schedule"] == "cubic" and group["optimizer_step"] == 3
    random_grads(model.parameters(), 3)
    loaded.step()
    assert loaded.sparsity()[0] == pytest.approx(0.5, abs=0.01)

# --- 2. while pruning, the kept weights follow AdamW step by step ---


def set_grads(params, t):
    """Write step t's gradients into existing .grad tensors (as after zero_grad(set_to_none=False))."""
    g = torch.Generator().manual_seed(2000 + t)
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(p.device)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"foreach": True}, {"amsgrad": True, "maximize": True}],
                         ids=["fused", "foreach", "amsgrad-maximize"])
def test_kept_weights_follow_adamw_with_the_same_mask_at_every_step(options, device):
    """torch.optim.AdamW, with AdamWPrune's own mask applied after each of its steps, is the
    reference: through compaction, two groups that differ in every pruning option, an LR
    scheduler, step(closure), a compacted tensor without gradient on some steps and a
    GradScaler step skipped for inf while pruning is under way."""
    ours, ref = small_conv_net().to(device), small_conv_net().to(device)

    def groups(model, pruning):
        convs, rest = [model[0].weight, model[2].weight], [model[4].weight, model[0].bias, model[2].bias,
                                                          model[4].bias]
        a = {"params": convs, "lr": 1e-2, "weight_decay": 0.1}
        b = {"params": rest, "lr": 3e-3, "weight_decay": 0.0}
        if pruning:
            a.update(sparsity=0.8, importance="variance", schedule="cubic", prune_start=3, prune_end=21, prune_every=3)
            b.update(sparsity=0.3, importance="magnitude", schedule="linear", prune_start=5, prune_end=25,
                     prune_every=4)
        return [a, b]
    opt = AdamWPrune(groups(ours, True), **options)
    ref_opt = torch.optim.AdamW(groups(ref, False), **options)
    lambdas = [lambda t: 1.0 / (1 + 0.05 * t), lambda t: 0.97 ** t]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambdas) for o in (opt, ref_opt)]
    scalers = [torch.amp.GradScaler(device, init_scale=4.0) for _ in range(2)]
    missing = ours[2].weight  # compacted early; some steps leave it without a gradient
    for t in range(40):
        skipped = t == 12
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            o.zero_grad(set_to_none=False)
            set_grads(model.parameters(), t)
            if t % 4 == 1:
                model[2].weight.grad = None
            if skipped:  # an inf gradient: GradScaler skips the step
                model[0].weight.grad[0, 0, 0, 0] = math.inf
                scaler.scale(torch.ones((), device=device))
                scaler.step(o)
                scaler.update()
            elif t == 7:
                o.step(lambda model=model, t=t: set_grads(model.parameters(), 100 + t) or torch.ones(()))
            else:
                o.step()
        if not skipped:
            for s in schedulers:
                s.step()
        with torch.no_grad():
            for p, q in zip(ours.parameters(), ref.parameters()):
                q.mul_(opt.kept_mask(p))
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert (p - q).abs().max().item() <= 1e-6, f"step {t}"
            assert torch.all(p[~opt.kept_mask(p)] == 0)
    assert "kept_index" in opt.state[missing] and "kept_index" in opt.state[ours[0].weight]
    # 30% pruned: compact with amsgrad (break-even a quarter), else dense with v = inf as its mask
    assert ("kept_index" in opt.state[ours[4].weight]) == options.get("amsgrad", False)
    assert opt.sparsity()[1][ours[4].weight] > 0.25
    assert zeros_fraction([ours[0].weight, ours[2].weight]) == pytest.approx(0.8, abs=0.002)

# --- 3. the schedule, exact counts, one global threshold ---


def test_pruned_fraction_equals_the_schedule_at_every_mask_update():
    model = small_net()
    start, end, every = 10, 60, 7
    opt = AdamWPrune(model.parameters(), sparsity=0.8, prune_start=start, prune_end=end, prune_every=every)
    params = prunable(model)
    numel = sum(p.numel() for p in params)
    checked = 0
    for t in range(1, 80):
        random_grads(model.parameters(), t)
        opt.step()
        if t >= start and ((t - start) % every == 0 or t == end):
            expected = round(cubic(t, 0.8, start, end) * numel)
            assert sum(int((p == 0).sum()) for p in params) == expected, f"step {t}"
            assert opt.sparsity()[0] == expected / numel
            checked += 1
    assert checked >= 8
    assert zeros_fraction(params) == round(0.8 * numel) / numel
    assert all(int((p == 0).sum()) == 0 for p in model.parameters() if p.dim() == 1)  # biases kept


def test_threshold_is_global_across_tensors():
    # lr = 0 leaves the weights as they are, so magnitude scores are known before the step:
    # the pruned set must be the k smallest |w| over all tensors together.
    model = small_net()
    with torch.no_grad():
        model[2].weight.mul_(10)  # a tensor of larger weights should lose fewer of them
    weights = torch.cat([p.detach().abs().flatten() for p in prunable(model)])
    k = round(0.5 * weights.numel())
    threshold = weights.sort().values[k - 1]
    expected = [(p.detach().abs() <= threshold) for p in prunable(model)]
    opt = AdamWPrune(model.parameters(), lr=0.0, weight_decay=0.0, sparsity=0.5, importance="magnitude",
                     prune_start=1, prune_end=1)
    random_grads(model.parameters(), 0)
    opt.step()
    for p, mask in zip(prunable(model), expected):
        assert torch.equal(p == 0, mask)
    per_tensor = opt.sparsity()[1]
    assert per_tensor[model[2].weight] < per_tensor[model[0].weight]


def test_ties_are_broken_to_the_exact_count_by_position():
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)  # every score equal
    opt = AdamWPrune(model.parameters(), lr=0.0, weight_decay=0.0, sparsity=0.37, importance="magnitude",
                     prune_start=1, prune_end=1)
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    assert torch.equal((model.weight == 0).flatten().nonzero().flatten(), torch.arange(37))


def test_a_small_model_always_keeps_one_weight():
    layer = nn.Linear(3, 1, bias=False)  # 3 weights: round(0.9 * 3) = 3 would prune them all
    opt = AdamWPrune(layer.parameters(), sparsity=0.9, prune_start=1, prune_end=1)
    random_grads(layer.parameters(), 0)
    opt.step()
    assert int((layer.weight == 0).sum()) == 2


def test_a_param_group_can_opt_out_of_pruning():
    model = small_net()
    opt = AdamWPrune([{"params": model[0].parameters(), "prune": False},
                      {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                     sparsity=0.6, prune_start=1, prune_end=5, prune_every=1)
    for t in range(10):
        random_grads(model.parameters(), t)
        opt.step()
    assert int((model[0].weight == 0).sum()) == 0
    assert zeros_fraction([model[2].weight, model[4].weight]) == pytest.approx(0.6, abs=1e-3)


def test_frozen_parameters_are_never_pruned_nor_given_state():
    model = small_net()
    model[0].weight.requires_grad_(False)  # e.g. a pretrained layer kept fixed
    opt = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=1, prune_end=4, prune_every=1)
    for t in range(6):
        random_grads([p for p in model.parameters() if p.requires_grad], t)
        opt.step()
    assert int((model[0].weight == 0).sum()) == 0 and not opt.state[model[0].weight]
    assert zeros_fraction([model[2].weight, model[4].weight]) == pytest.approx(0.5, abs=1e-3)


def test_a_weight_that_never_had_a_gradient_ranks_lowest_under_the_state_scores():
    model = small_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.2, importance="variance", prune_start=3, prune_end=3)
    for t in range(3):
        random_grads(model.parameters(), t)
        model[4].weight.grad = None  # never trained: m = v = 0, so its variance score is 0
        opt.step()
    assert opt.sparsity()[1][model[4].weight] == 1.0


def test_prunable_means_trained_and_2d_unless_the_group_says_so():
    matrix, vector, frozen = torch.zeros(3, 4, requires_grad=True), torch.zeros(4, requires_grad=True), torch.zeros(3, 4)
    assert [prunable_rule(p, {"prune": None}) for p in (matrix, vector, frozen)] == [True, False, False]
    assert [prunable_rule(p, {"prune": True}) for p in (matrix, vector, frozen)] == [True, True, False]
    assert [prunable_rule(p, {"prune": False}) for p in (matrix, vector, frozen)] == [False, False, False]


def test_mask_updates_are_due_on_the_grid_from_prune_start_and_at_prune_end():
    group = {"sparsity": 0.5, "prune_start": 10, "prune_end": 25, "prune_every": 4}
    assert [c for c in range(40) if mask_update_due(c, group)] == [10, 14, 18, 22, 25]
    assert not any(mask_update_due(c, {**group, "sparsity": 0.0}) for c in range(40))


def test_pruned_weights_rank_below_kept_weights_that_score_zero():
    """Pruned weights score -inf, not 0: kept weights whose m = v = 0 (no gradient yet) score exactly 0."""
    layer = nn.Linear(10, 10, bias=False)
    opt = AdamWPrune(layer.parameters(), sparsity=0.3, prune_start=0, prune_end=2, prune_every=1)
    random_grads(layer.parameters(), 0)
    opt.step()  # step 1: cubic, 26 of 100 pruned (dense form: v = +inf)
    assert zeros_fraction([layer.weight]) == 0.26
    kept_early = [i for i in range(100) if layer.weight.view(-1)[i] != 0][:10]
    state = opt.state[layer.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key].view(-1)[kept_early] = 0.0  # as if they never had a gradient: they score 0
    random_grads(layer.parameters(), 1)
    layer.weight.grad.view(-1)[kept_early] = 0.0
    opt.step()  # step 2: 30 of 100; the 4 new ones are the first of the zero scores, by position
    pruned = (layer.weight.view(-1) == 0).nonzero().flatten().tolist()
    assert len(pruned) == 30 and set(kept_early[:4]) <= set(pruned) and not set(kept_early[4:]) & set(pruned)


# --- 4. pruned stays pruned ---


def test_pruned_weights_stay_exactly_zero_and_masks_never_unprune():
    model = small_net()
    opt = AdamWPrune(model.parameters(), lr=0.05, sparsity=0.9, prune_start=5, prune_end=40, prune_every=5)
    previous = [torch.zeros_like(p, dtype=torch.bool) for p in prunable(model)]
    for t in range(1, 70):
        random_grads(model.parameters(), t, scale=100.0)  # large gradients push every weight
        opt.step()
        masks = [p == 0 for p in prunable(model)]
        for before, now in zip(previous, masks):
            assert torch.all(now[before]), f"a pruned weight came back at step {t}"
        previous = masks
    assert zeros_fraction(prunable(model)) == pytest.approx(0.9, abs=1e-3)

# --- 5. the importance scores ---


def test_each_importance_score_ranks_as_its_formula_says():
    w = [0.5, -2.0, 1.0, -0.1, 3.0]
    m = [0.2, -0.01, -0.5, 0.4, 0.001]
    v = [0.04, 1e-4, 0.25, 0.01, 1.0]
    eps = 1e-8
    formulas = {
        "hybrid": lambda w, m, v: abs(w * m) * abs(w) / (math.sqrt(v) + eps),
        "variance": lambda w, m, v: abs(w) * v ** 0.25,
        "momentum": lambda w, m, v: abs(w) * math.sqrt(abs(m)),
        "magnitude": lambda w, m, v: abs(w),
    }
    for name, formula in formulas.items():
        expected = [formula(*x) for x in zip(w, m, v)]
        got = importance_score(name, torch.tensor(w), torch.tensor(m), torch.tensor(v), eps)
        assert got.tolist() == pytest.approx(expected, rel=1e-5), name
        assert got.argsort().tolist() == sorted(range(5), key=expected.__getitem__), name


@pytest.mark.parametrize("importance", ["hybrid", "variance", "momentum", "magnitude"])
def test_the_optimizer_prunes_the_lowest_scores_of_a_hand_made_state(importance):
    # Zero gradients and lr = 0: m and v only shrink by beta1, beta2 (ranking unchanged), w stays.
    w = torch.tensor([[0.5, -2.0, 1.0, -0.1, 3.0, 0.7]])
    m = torch.tensor([[0.2, -0.01, -0.5, 0.4, 0.001, 0.03]])
    v = torch.tensor([[0.04, 1e-4, 0.25, 0.01, 1.0, 0.5]])
    layer = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    opt = AdamWPrune(layer.parameters(), lr=0.0, weight_decay=0.0, sparsity=0.5, importance=importance,
                     prune_start=2, prune_end=2)
    layer.weight.grad = torch.zeros_like(w)
    opt.step()  # step 1 creates the state; now replace it by the hand-made one
    opt.state[layer.weight]["exp_avg"].copy_(m)
    opt.state[layer.weight]["exp_avg_sq"].copy_(v)
    opt.step()
    formula = {
        "hybrid": (w * m).abs() * w.abs() / (v.sqrt() + 1e-8),
        "variance": w.abs() * v ** 0.25,
        "momentum": w.abs() * m.abs().sqrt(),
        "magnitude": w.abs(),
    }[importance]
    lowest3 = set(formula.flatten().argsort()[:3].tolist())
    assert set((layer.weight.flatten() == 0).nonzero().flatten().tolist()) == lowest3

# --- 6. the k lowest scores: radix select against a sort ---


def sorted_reference(scores, k, unscored=0):
    """Per tensor, a bool mask of the k lowest scores of all (the unscored counted first), by a stable sort."""
    everything = torch.cat(scores).add(0.0)  # -0.0 ranks as 0.0
    prune = torch.zeros(everything.numel(), dtype=torch.bool)
    prune[torch.sort(everything, stable=True).indices[:max(0, k - unscored)]] = True
    return list(prune.split([s.numel() for s in scores]))


def lowest_k_masks(scores, k, unscored=0, device="cpu"):
    found = lowest_k([lambda s=s: s.to(device, copy=True) for s in scores], k, device, unscored)
    return None if found is None else [prune.cpu() for _, prune in found[1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["many ties", "subnormals, zeros and huge values", "already pruned",
                                  "negative", "random"])
def test_lowest_k_marks_what_a_stable_sort_marks(kind, device):
    rng = random.Random(kind)
    values = {"many ties": [0.0, 0.25, 0.5, 1.0],
              "subnormals, zeros and huge values": [0.0, -0.0, 1e-45, 3e-42, 1e-38, 1.0, 3e38, -1e-45, -3e38],
              "already pruned": [-math.inf, 0.1, 0.2, 0.3, 1e-30],
              "negative": [-2.0, -1.0, -1e-30, -1e-45, 0.0, 5.0]}
    for trial in range(40):
        sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 5))]
        if kind == "random":
            scores = [torch.randn(n, generator=torch.Generator().manual_seed(trial)) for n in sizes]
        else:
            scores = [torch.tensor(rng.choices(values[kind], k=n), dtype=torch.float32) for n in sizes]
        unscored = rng.randint(0, 3) if kind == "already pruned" else 0
        total = sum(sizes) + unscored
        if total < 2:
            continue
        k = rng.randint(1, total - 1)
        got, expected = lowest_k_masks(scores, k, unscored, device), sorted_reference(scores, k, unscored)
        if got is None:  # nothing new to prune: the k lowest are all pruned already
            assert k <= unscored + sum(int((s == -math.inf).sum()) for s in scores)
            continue
        for g, e in zip(got, expected):
            assert torch.equal(g, e), (trial, scores, k)


def test_lowest_k_in_one_process_reads_each_tensor_three_times_holding_one_tensors_scores_at_a_time():
    # Eight tensors of 200,000 weights: a concatenation of all scores would be 6.4 MB.
    n, k = 200_000, 700_000
    torch.manual_seed(0)
    tensors = [(torch.randn(n), torch.randn(n), torch.rand(n)) for _ in range(8)]
    calls = []
    score_fns = [lambda i=i, t=t: calls.append(i) or importance_score("variance", *t, 1e-8)
                 for i, t in enumerate(tensors)]
    with memory.TensorMemoryTracker() as tracker:
        marks = [prune.clone() for _, prune in lowest_k(score_fns, k, "cpu")[1]]
    assert sorted(calls) == sorted(list(range(8)) * 3)  # three passes
    scores_bytes, marks_bytes, histogram_bytes = 4 * n, 8 * n, 8 * 2**16  # a histogram: 512 KiB
    # one tensor's float32 scores and bool marks, the marks kept here, and at most four histograms
    assert tracker.peak_bytes <= scores_bytes * 5 // 4 + marks_bytes + 4 * histogram_bytes + 4096
    assert tracker.peak_bytes < 8 * scores_bytes  # a concatenation of the scores alone
    everything = torch.cat([importance_score("variance", *t, 1e-8) for t in tensors])
    assert torch.equal(torch.cat(marks), sorted_reference([everything], k)[0])


def test_non_finite_scores_skip_the_mask_update_with_a_warning():
    model = small_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=3, prune_end=3)
    for t in range(2):
        random_grads(model.parameters(), t)
        opt.step()
    random_grads(model.parameters(), 2)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert opt.sparsity()[0] == 0.0  # nothing was pruned on NaN scores

# --- 7. memory contract ---


def state_bytes(opt, params):
    return memory.optimizer_state_bytes(opt, params)


def test_no_extra_state_before_pruning_starts_nor_while_sparsity_is_low():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), sparsity=0.3, prune_start=5, prune_end=8, prune_every=1)
    ref_opt = torch.optim.AdamW(ref.parameters())
    for t in range(10):
        random_grads(ours.parameters(), t)
        random_grads(ref.parameters(), t)
        opt.step()
        ref_opt.step()
        ours_bytes, adamw_bytes = state_bytes(opt, list(ours.parameters())), state_bytes(ref_opt, list(ref.parameters()))
        # the same bytes as AdamW before pruning; after it, never more (a tensor may compact)
        assert ours_bytes == adamw_bytes if t < 4 else ours_bytes <= adamw_bytes
    assert opt.sparsity()[0] == pytest.approx(0.3, abs=1e-3)
    assert any("kept_index" not in opt.state[p] and opt.sparsity()[1][p] > 0 for p in prunable(ours))  # v = +inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad, bytes_per_kept", [(False, 12), (True, 16)])
def test_state_bytes_per_prunable_weight_at_70_percent(amsgrad, bytes_per_kept, device):
    model = small_conv_net().to(device)
    opt = AdamWPrune(model.parameters(), sparsity=0.7, amsgrad=amsgrad, prune_start=2, prune_end=20, prune_every=3)
    for t in range(25):
        random_grads(model.parameters(), t)
        opt.step()
    params = prunable(model)
    numel = sum(p.numel() for p in params)
    assert zeros_fraction(params) == round(0.7 * numel) / numel
    # 3.6 B (4.8 with amsgrad): int32 kept_index plus m, v (and v_max) of the kept 30%; 4 B of
    # `step` per tensor, as AdamW's
    assert state_bytes(opt, params) <= (0.3 * numel + 1) * bytes_per_kept + 4 * len(params)
    others = [p for p in model.parameters() if p.dim() < 2]
    assert state_bytes(opt, others) == (bytes_per_kept - 4) * sum(p.numel() for p in others) + 4 * len(others)


@pytest.mark.parametrize("dtype, amsgrad", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_a_tensor_is_compacted_exactly_when_compact_state_is_smaller(dtype, amsgrad):
    moments = 3 if amsgrad else 2
    for sparsity in (0.2, 0.3, 0.4, 0.45, 0.55, 0.6):
        layer = nn.Linear(100, 100, bias=False).to(dtype)
        opt = AdamWPrune(layer.parameters(), sparsity=sparsity, amsgrad=amsgrad, prune_start=1, prune_end=1)
        random_grads(layer.parameters(), 0)
        opt.step()
        kept = 10_000 - round(sparsity * 10_000)
        dense_bytes = 10_000 * moments * layer.weight.element_size()
        compact_bytes = kept * (4 + moments * layer.weight.element_size())
        assert ("kept_index" in opt.state[layer.weight]) == (compact_bytes < dense_bytes), sparsity
        assert state_bytes(opt, [layer.weight]) == min(dense_bytes, compact_bytes) + 4  # + `step`


def test_the_break_even_of_the_two_forms_by_hand():
    from adamwprune import compact_is_smaller
    # kept * (4 B of index + moments * element) against numel * moments * element; a tie stays dense
    assert [compact_is_smaller(kept, 3, 2, 4) for kept in (1, 2)] == [True, False]  # fp32: 12 B against 8 B
    assert [compact_is_smaller(kept, 4, 3, 4) for kept in (2, 3)] == [True, False]  # amsgrad: 16 against 12
    assert [compact_is_smaller(kept, 4, 2, 2) for kept in (1, 2)] == [True, False]  # bf16: 8 against 4


# --- 8. state_dict round trip ---


def make_pruning_run():
    model = small_conv_net()
    opt = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.8, prune_start=4, prune_end=22, prune_every=3)
    return model, opt


@pytest.mark.parametrize("save_at", [3, 5, 17])  # before pruning; dense with the v = +inf mask; compact
def test_resume_from_state_dict_is_bit_identical(save_at):
    model, opt = make_pruning_run()
    for t in range(30):
        random_grads(model.parameters(), t)
        opt.step()
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = make_pruning_run()
    for t in range(save_at):
        random_grads(model.parameters(), t)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, opt = make_pruning_run()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for t in range(save_at, 30):
        random_grads(model.parameters(), t)
        opt.step()
    assert any("kept_index" in s for s in opt.state.values())
    for a, b in zip(model.parameters(), uninterrupted):
        assert torch.equal(a.detach(), b)


def pruned_layer(shape, sparsity):
    """A Linear layer of weight `shape` pruned by AdamWPrune to `sparsity` at its first step (compact past 1/3)."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False)
    opt = AdamWPrune(layer.parameters(), sparsity=sparsity, prune_start=1, prune_end=1)
    random_grads(layer.parameters(), 0)
    opt.step()
    return layer, opt


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("saved, loaded, sparsity, complaint", [
    ((3, 7), (300, 300), 0.0, r"exp_avg has shape \(3, 7\) where \(300, 300\) fits"),  # was: a segfault
    ((10, 10), (3, 7), 0.0, r"exp_avg has shape \(10, 10\) where \(3, 7\) fits"),  # was: a silent step
    ((10, 10), (4, 25), 0.5, r"its compact state is of a tensor of shape \(10, 10\), this one is \(4, 25\)"),
    ((10, 10), (3, 7), 0.5, r"kept_index .* is no list of positions of 21"),
], ids=["dense-into-larger", "dense-into-smaller", "compact-same-numel", "compact-into-smaller"])
def test_state_that_does_not_fit_its_parameter_is_refused_naming_it(fused, saved, loaded, sparsity, complaint):
    state = pruned_layer(saved, sparsity)[1].state_dict()
    if "kept_index" in complaint:
        del state["state"][0]["shape"]  # as an older AdamWPrune saved it
    target = nn.Linear(loaded[1], loaded[0], bias=False)
    before = target.weight.detach().clone()
    opt = AdamWPrune(target.parameters(), prune_start=100, prune_end=200, fused=fused)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: " + complaint):
        opt.load_state_dict(state)
    assert opt.state_dict()["state"] == {}  # nothing was loaded
    target(torch.randn(4, loaded[1])).sum().backward()
    opt.step()  # it still trains, from fresh state
    assert not torch.equal(target.weight, before)


@pytest.mark.parametrize("fused", [True, False])
def test_compact_state_gives_adamw_no_moment_to_misuse_and_adamw_state_dict_brings_it_back(fused):
    layer, opt = pruned_layer((10, 10), 0.7)
    state = opt.state_dict()
    assert "exp_avg" not in state["state"][0] and "kept_exp_avg" in state["state"][0]
    adamw = torch.optim.AdamW(layer.parameters(), fused=fused)
    adamw.load_state_dict(state)
    random_grads(layer.parameters(), 1)
    with pytest.raises(KeyError, match="exp_avg"):  # was: a corrupted heap
        adamw.step()


def test_adamw_state_dict_steps_in_adamw_as_adamwprune_steps_once_pruning_ended():
    ours, ref = small_net(), small_net()
    groups = lambda model: [{"params": [model[0].weight], "sparsity": 0.25}, {"params": list(model.parameters())[1:]}]
    options = dict(lr=1e-2, sparsity=0.7, prune_start=2, prune_end=6, prune_every=2)
    opt, ref_opt = AdamWPrune(groups(ours), **options), AdamWPrune(groups(ref), **options)
    max_difference_after(8, ours, opt, ref, ref_opt)
    assert any("kept_index" in s for s in opt.state.values()) and any(
        "exp_avg_sq" in s and (s["exp_avg_sq"] == math.inf).any() for s in opt.state.values())  # both forms
    adamw = torch.optim.AdamW(groups(ours), lr=1e-2, fused=True)
    adamw.load_state_dict(opt.adamw_state_dict())
    assert max_difference_after(10, ours, adamw, ref, ref_opt) <= 1e-6
    assert [zeros_fraction([p]) for p in prunable(ours)] == [zeros_fraction([p]) for p in prunable(ref)]
    assert zeros_fraction(prunable(ours)[:1]) == pytest.approx(0.25, abs=0.01)  # dense, v = +inf


@pytest.mark.parametrize("sparsity, form", [(0.7, "compact"), (0.3, "dense")])  # compact past a third pruned
def test_adamw_state_dict_without_the_pruned_gives_them_zero_moments_and_adamw_trains_them(sparsity, form):
    layer, opt = pruned_layer((10, 10), sparsity)
    state, kept = opt.state[layer.weight], opt.kept_mask(layer.weight)
    assert ("kept_index" in state) == (form == "compact")
    kept_m, kept_v = ((state["kept_exp_avg"], state["kept_exp_avg_sq"]) if form == "compact" else
                      (state["exp_avg"][kept], state["exp_avg_sq"][kept]))
    pruned = round(100 * sparsity)
    dense = opt.adamw_state_dict(keep_pruned=False)["state"][0]
    assert torch.equal(dense["exp_avg"][~kept], torch.zeros(pruned)) and torch.equal(
        dense["exp_avg_sq"][~kept], torch.zeros(pruned))
    assert torch.equal(dense["exp_avg"][kept], kept_m) and torch.equal(dense["exp_avg_sq"][kept], kept_v)
    adamw = torch.optim.AdamW(layer.parameters())  # takes lr 1e-3 and the rest from the state_dict
    adamw.load_state_dict(opt.adamw_state_dict(keep_pruned=False))
    random_grads(layer.parameters(), 1)
    g = layer.weight.grad[~kept].clone()
    adamw.step()
    # from m = v = 0 at AdamW's step n = 2: m = 0.1 g, v = 0.001 g^2, bias-corrected by 1 - beta^2
    m_hat, v_hat = 0.1 * g / (1 - 0.9 ** 2), 0.001 * g * g / (1 - 0.999 ** 2)
    assert torch.allclose(layer.weight.detach()[~kept], -1e-3 * m_hat / (v_hat.sqrt() + 1e-8), atol=1e-7)


def test_an_older_adamwprune_compact_state_with_exp_avg_keys_loads_and_resumes():
    model, opt = make_pruning_run()
    for t in range(20):
        random_grads(model.parameters(), t)
        opt.step()
    expected_model, expected = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    saved = opt.state_dict()
    for state in saved["state"].values():  # as written before the compact moments had keys of their own
        for key in [key for key in state if key.startswith("kept_exp")]:
            state[key[len("kept_"):]] = state.pop(key)
        state.pop("shape", None)
    loaded = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.8, prune_start=4, prune_end=22, prune_every=3)
    loaded.load_state_dict(saved)
    for t in range(20, 25):
        random_grads(model.parameters(), t)
        random_grads(expected_model.parameters(), t)
        loaded.step()
    reference = AdamWPrune(expected_model.parameters(), lr=1e-2, sparsity=0.8, prune_start=4, prune_end=22,
                           prune_every=3)
    reference.load_state_dict(expected)
    for t in range(20, 25):
        random_grads(expected_model.parameters(), t)
        reference.step()
    for a, b in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(a, b)


def test_a_deep_copy_mid_pruning_takes_its_next_mask_updates_as_the_original_does():
    # copy.deepcopy and pickle go through the optimizer's __getstate__, which torch's Optimizer
    # limits to defaults, state and param groups: the copy must keep the rest (check_replicas)
    model, opt = make_pruning_run()
    for t in range(10):
        random_grads(model.parameters(), t)
        opt.step()
    twin_model, twin = copy.deepcopy((model, opt))
    assert twin.param_groups[0]["params"][0] is twin_model[0].weight and twin.check_replicas is None
    for t in range(10, 25):  # mask updates at steps 10, 13, ..., 22
        for m, o in ((model, opt), (twin_model, twin)):
            random_grads(m.parameters(), t)
            o.step()
    assert opt.sparsity()[0] == pytest.approx(0.8, abs=0.01)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)

# --- 9. devices, dtypes, layouts ---


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prunes_and_trains_on_each_device_and_dtype(device, dtype):
    torch.manual_seed(0)
    model = small_net().to(device=device, dtype=dtype)
    x = torch.randn(256, 12, device=device, dtype=dtype)
    y = x[:, :4].argmax(1)  # a learnable target
    opt = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.7, prune_start=20, prune_end=120, prune_every=10)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = prunable(model)
    numel = sum(p.numel() for p in params)
    assert zeros_fraction(params) == round(0.7 * numel) / numel
    assert losses[-1] < 0.5 * losses[0]
    assert all(moment.dtype == dtype for s in opt.state.values() for key, moment in s.items() if "exp_avg" in key)
    assert opt.param_groups[0]["fused"]  # torch's fused kernel, picked by default


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_conv_weights_prune_like_contiguous_ones_whatever_the_gradients_layout(device):
    runs = []
    for channels_last, contiguous_grads in ((False, True), (True, False), (True, True)):
        model = small_conv_net().to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        opt = AdamWPrune(model.parameters(), sparsity=0.7, prune_start=2, prune_end=10, prune_every=2)
        for t in range(15):
            random_grads(model.parameters(), t)
            if contiguous_grads:  # a gradient need not share its parameter's layout
                for p in model.parameters():
                    p.grad = p.grad.contiguous()
            opt.step()
        runs.append([p.detach().contiguous() for p in model.parameters()])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)

# --- 10. bad input ---


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "betas[0]"), (dict(betas=(0.9, -0.1)), "betas[1]"), (dict(betas=(0.9,)), "betas"),
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(prune_start=100, prune_end=10), "prune_end"), (dict(prune_every=0), "prune_every"),
    (dict(importance="random"), "importance"), (dict(schedule="exponential"), "schedule"),
    (dict(importance="hybrid", eps=0.0), "eps"), (dict(capturable=True), "capturable"),
    (dict(differentiable=True), "differentiable"), (dict(fused=True, foreach=True), "fused"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError) as error:
        AdamWPrune(small_net().parameters(), **kwargs)
    message = str(error.value)
    assert message.startswith(f"Invalid {name}: ")
    assert "must" in message or "choose from" in message  # says what is allowed


def test_bad_option_in_a_param_group_raises_too():
    model = small_net()
    with pytest.raises(ValueError, match="Invalid sparsity"):
        AdamWPrune([{"params": model.parameters(), "sparsity": 1.5}])


def test_sparse_gradients_raise_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = AdamWPrune(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("make, complaint", [
    (lambda: nn.Linear(4, 3, dtype=torch.complex64), "parameter 0 of param group 0 is complex"),
    (lambda: nn.Linear(4, 3, device="meta"), "parameter 0 of param group 0 is on the meta device"),
], ids=["complex", "meta"])
def test_parameters_it_cannot_step_or_score_are_refused_at_construction(make, complaint):
    with pytest.raises(ValueError, match=complaint):  # was: errors inside the fused kernel or the mask update
        AdamWPrune(make().parameters())

# --- 11. the pruned model, smaller on disk ---


def pruned_by_adamwprune(steps=60):
    """small_conv_net trained on a learnable task to 70% sparsity; (model, x, y)."""
    model = small_conv_net()
    x = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x[:, 0, :5, 0].argmax(1)
    opt = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.7, prune_start=5, prune_end=30, prune_every=5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), size


def test_a_compact_state_dict_loads_back_bit_identical_and_strictly_into_the_model():
    model, x, y = pruned_by_adamwprune()
    loaded, _ = saved_and_loaded(compact_state_dict(model))
    fresh = small_conv_net(seed=1)
    fresh.load_state_dict(dense_state_dict(loaded), strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(isinstance(entry, dict) for entry in loaded.values())  # something was compacted
    assert torch.is_tensor(loaded["0.bias"])  # a bias without zeros stays as it is


def test_a_model_pruned_by_a_baseline_compacts_too_and_bf16_values_keep_its_accuracy():
    model, x, y = pruned_by_adamwprune()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8
    baseline = train.MagnitudePruning(list(model.parameters()), 0.8, prune_start=1, prune_end=1, prune_every=1)
    baseline.step()  # 80% by magnitude, the baseline's own masks
    for values_dtype in (None, torch.bfloat16):
        loaded, _ = saved_and_loaded(compact_state_dict(model, values_dtype=values_dtype))
        fresh = small_conv_net(seed=1)
        fresh.load_state_dict(dense_state_dict(loaded))
        assert zeros_fraction(prunable(fresh)) == zeros_fraction(prunable(model))
        for a, b in zip(model.parameters(), fresh.parameters()):  # bf16: 8 bits of mantissa
            assert torch.allclose(a, b, rtol=0 if values_dtype is None else 2 ** -8, atol=0)
        reloaded_accuracy = (fresh(x).argmax(1) == y).float().mean().item()
        assert reloaded_accuracy == pytest.approx((model(x).argmax(1) == y).float().mean().item(), abs=0.02)


@pytest.mark.parametrize("values_dtype, value_bytes", [(None, 4), (torch.bfloat16, 2)])
def test_the_file_holds_the_kept_values_and_one_bit_per_weight(values_dtype, value_bytes):
    layer = nn.Linear(1000, 1000, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(1000, 1000, generator=torch.Generator().manual_seed(0)) < 0.3)
    kept = int((layer.weight != 0).sum())
    _, dense_bytes = saved_and_loaded(layer.state_dict())
    _, compact_bytes = saved_and_loaded(compact_state_dict(layer, values_dtype=values_dtype))
    formula_bytes = kept * value_bytes + 10**6 / 8  # values, and the packed mask
    assert formula_bytes <= compact_bytes <= formula_bytes + 2048  # + the file's own overhead
    assert compact_bytes < (0.36 if value_bytes == 4 else 0.2) * dense_bytes


@pytest.mark.parametrize("kept, form", [(312, "indices"), (313, "bitmask")])  # 4 B each against 10,000 bits
def test_a_tensor_kept_under_one_in_32_is_stored_as_int32_positions_and_loads_back_bit_identical(kept, form):
    weight = torch.zeros(100, 100)
    where = torch.randperm(10**4, generator=torch.Generator().manual_seed(0))[:kept]
    weight.view(-1)[where] = torch.randn(kept, generator=torch.Generator().manual_seed(1))
    loaded, _ = saved_and_loaded(compact_state_dict({"w": weight}))
    entry = loaded["w"]
    assert set(entry) & {"indices", "bitmask"} == {form}  # 1,248 B of positions < 1,250 B of bits < 1,252
    if form == "indices":
        assert entry["indices"].dtype == torch.int32 and torch.equal(entry["indices"].long(), where.sort().values)
    assert torch.equal(dense_state_dict(loaded)["w"], weight)


def test_memory_py_pruned_model_reports_lenet5s_file_sizes_within_their_hand_bounds():
    size, csr = memory.pruned_model_report("lenet5", repeats=1)  # the README's table: memory.py --pruned-model
    dense_kib, fp32, bf16 = (float(x) for x in re.search(
        r"dense state_dict ([\d.]+) KiB; compact file: fp32 values [\d.]+ KiB \(([\d.]+)x\), "
        r"bf16 values [\d.]+ KiB \(([\d.]+)x\)", size).groups())
    assert 61706 * 4 / 1024 < dense_kib < 61706 * 4 / 1024 + 8  # 61,706 floats, and the file's own bytes
    # the kept 30% of the values and a bit per weight: 0.3 + 1/32 of the dense bytes (bf16: 0.15 + 1/32), at
    # least; the file's own bytes and the biases' (not compacted) add a few hundredths
    assert 0.33 < fp32 < 0.36 and 0.18 < bf16 < 0.215
    assert re.fullmatch(r"lenet5 linear layers, batch 128: dense with zeros [\d.]+ ms, CSR [\d.]+ ms \([\d.]+x\)", csr)


def test_damaged_compact_entries_and_non_tensors_get_a_clear_error():
    model, _, _ = pruned_by_adamwprune(steps=10)
    compact = compact_state_dict(model)
    name = next(name for name, entry in compact.items() if isinstance(entry, dict))
    short = {**compact, name: {**compact[name], "bitmask": compact[name]["bitmask"][:-1]}}
    with pytest.raises(ValueError, match=f"entry '{name}' is not a compact tensor.*damaged"):
        dense_state_dict(short)
    fewer_values = {**compact, name: {**compact[name], "values": compact[name]["values"][1:]}}
    with pytest.raises(ValueError, match="damaged"):
        dense_state_dict(fewer_values)
    with pytest.raises(TypeError, match="'step' is a int, not a tensor"):
        compact_state_dict({**model.state_dict(), "step": 3})


# --- 12. copyable alone ---


def test_adamwprune_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse(open(os.path.join(HERE, "adamwprune.py")).read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules - {"torch"} <= set(sys.stdlib_module_names)


def test_copied_alone_into_an_empty_folder_it_trains_a_model(tmp_path):
    shutil.copy(os.path.join(HERE, "adamwprune.py"), tmp_path)
    script = tmp_path / "train_tiny.py"
    script.write_text(
        "import torch, torch.nn as nn\n"
        "from adamwprune import AdamWPrune\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))\n"
        "x = torch.randn(512, 8); y = (x[:, 0] > 0).long()\n"
        "opt = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.7, prune_start=50, prune_end=200, prune_every=10)\n"
        "for _ in range(300):\n"
        "    opt.zero_grad(); loss = nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()\n"
        "acc = (model(x).argmax(1) == y).float().mean().item()\n"
        "print(f'{acc:.3f} {opt.sparsity()[0]:.3f}')\n")
    # -E -s: no PYTHONPATH, no user site; the script's own folder is all it can import from
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-E", "-s", str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    accuracy, sparsity = map(float, out.stdout.split())
    assert accuracy > 0.9
    assert sparsity == pytest.approx(0.7, abs=0.002)

# === memory.py ===

# --- memory.py: accounting against hand computation ---

LENET5_PARAMS = 61_706
LENET5_PRUNABLE = 61_706 - (6 + 16 + 120 + 84 + 10)  # all but the biases


def lenet5_after_one_step(optimizer_name, pruning="none", sparsity=0.0):
    rig = memory.Rig("lenet5", optimizer_name, pruning, sparsity, "cpu")
    rig.train_step()
    return rig


def test_adamw_training_state_on_lenet5_is_counted_exactly_by_category():
    rig = lenet5_after_one_step("adamw")
    counted = memory.training_state_bytes(rig.model, rig.optimizer, rig.buffers())
    assert counted["parameters"] == 4 * LENET5_PARAMS
    assert counted["gradients"] == 4 * LENET5_PARAMS
    # m and v in fp32, plus torch's `step`: a 0-d float32 tensor for each of the 10 parameters
    assert counted["optimizer_state"] == memory.optimizer_state_bytes(rig.optimizer) == 8 * LENET5_PARAMS + 4 * 10
    assert counted["pruning_buffers"] == 0 and counted["model_buffers"] == 0
    assert counted["total"] == 16 * LENET5_PARAMS + 40


@pytest.mark.parametrize("optimizer, pruning, sparsity, state_bytes, pruning_bytes", [
    ("sgd", "none", 0.0, (4, 4), 0),  # the momentum buffer
    ("adamw", "movement", 0.7, (8, 8), 4 + 1),  # m, v; a float32 score and a bool mask
    ("adamw", "magnitude", 0.7, (8, 8), 1),  # m, v; a bool mask
    ("adamwprune", "state", 0.0, (8, 8), 0),  # m, v and nothing else before pruning
    ("adamwprune", "state", 0.7, (8 * 0.3, 3.6), 0),  # m, v and an int32 index for the kept 30% only
])
def test_bytes_per_prunable_weight_on_lenet5_are_those_of_each_method(optimizer, pruning, sparsity, state_bytes,
                                                                      pruning_bytes):
    rig = lenet5_after_one_step(optimizer, pruning, sparsity)  # Rig prunes at step 1, straight to `sparsity`
    rig.train_step()
    state, buffers = rig.bytes_per_prunable()
    step_bytes = 4 * 5 if "adamw" in optimizer else 0  # AdamW's 0-d float32 `step` of each prunable tensor
    low, high = state_bytes
    assert low <= state - step_bytes / LENET5_PRUNABLE <= high + 12 / LENET5_PRUNABLE  # 12 B: one weight of rounding
    assert buffers == pruning_bytes


@pytest.mark.parametrize("optimizer, pruning, state_bytes, pruning_bytes", [
    ("adamw", "none", 8.0, 0.0), ("adamw", "movement", 8.0, 5.0), ("adamwprune", "state", None, 0.0)])
def test_the_gpt_tiny_rig_holds_the_bytes_per_prunable_weight_of_the_contract(optimizer, pruning, state_bytes,
                                                                            pruning_bytes):
    rig = memory.Rig("gpt-tiny", optimizer, pruning, 0.7 if pruning != "none" else 0.0, "cpu")
    rig.train_step()  # prunes at step 1, straight to 70%
    # by hand: the 2-D tensors of 4 blocks of width 128 (attention 128x384 and 128x128, MLP 2 x 128x512), the
    # token embedding 65x128 (tied with the output layer, counted once) and the positions 64x128
    numel = 4 * (128 * 384 + 128 * 128 + 2 * 128 * 512) + 65 * 128 + 64 * 128
    assert sum(p.numel() for p in rig.prunable) == numel
    state, buffers = rig.bytes_per_prunable()
    if state_bytes is None:  # AdamWPrune at 70%: an int32 index, m and v for each kept weight, counted here
        kept = sum(int((p != 0).sum()) for p in rig.prunable)
        assert kept == numel - round(0.7 * numel)
        by_hand = sum(t.numel() * t.element_size() for p in rig.prunable for key, t in rig.optimizer.state[p].items()
                      if torch.is_tensor(t) and key != "step")
        assert by_hand <= kept * (4 + 4 + 4) and state <= 3.6  # 12 B per kept weight; 3.6 B at 70%
        assert state * numel == pytest.approx(by_hand + 4 * len(rig.prunable))  # and the 0-d steps
    else:
        assert state * numel == pytest.approx(state_bytes * numel + 4 * len(rig.prunable))  # and the 0-d steps
    assert buffers == pruning_bytes


REDUCED_GPT2 = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=512)  # gpt2's rows in seconds


def test_the_gpt2_rows_one_rig_at_a_time_hold_the_contract_on_a_reduced_shape(monkeypatch, capsys):
    monkeypatch.setitem(GPT_SHAPES, "gpt2", REDUCED_GPT2)
    alive, real_rig = [], memory.Rig

    def counted_rig(*args, **kwargs):  # a weak reference per rig: how many are alive when the next is made
        import weakref
        alive[:] = [r for r in alive if r() is not None]
        assert not alive, "a rig was still alive when the next was made"
        rig = real_rig(*args, **kwargs)
        alive.append(weakref.ref(rig))
        return rig
    monkeypatch.setattr(memory, "Rig", counted_rig)
    memory.main(["--model", "gpt2", "--repeats", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    rows = {tuple(line.split()[1:4:2]) + (line.split()[5],): line.split() for line in out.splitlines()
            if line.startswith("gpt2 ")}
    # by hand, bytes per prunable weight: AdamW's m and v, 8; AMSGrad's third moment, 12; SGD's momentum, 4;
    # AdamWPrune at sparsity s: at most an int32 index, m and v per kept weight, 12 (1 - s) (one global threshold
    # prunes some tensors more than s: compact, they hold less; a tensor pruned below 1/3 keeps 8); plus the steps
    prunable = 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 512 * 64 + 32 * 64
    steps = 4 * 10 / prunable  # a float32 step for each of the 10 prunable tensors
    expected = {("adamw", "none", "0.0%"): 8, ("adamw", "movement", "70.0%"): 8, ("adamwadv", "movement", "70.0%"): 12,
                ("sgd", "movement", "70.0%"): 4, ("adamwprune", "state", "50.0%"): 6.0,
                ("adamwprune", "state", "70.0%"): 3.6, ("adamwprune", "state", "90.0%"): 1.2}
    for key, by_hand in expected.items():
        state, by_hand = float(rows[key][6]), by_hand + (steps if key[0] != "sgd" else 0)
        if key[0] == "adamwprune":
            assert by_hand - 0.25 < state <= by_hand + 0.005, key
        else:
            assert state == pytest.approx(by_hand, abs=0.006), key
    assert float(rows["adamw", "movement", "70.0%"][7]) == 5.0 and float(rows["adamwprune", "state", "70.0%"][7]) == 0
    peak = {key: float(row[8]) for key, row in rows.items()}
    assert peak["adamwprune", "state", "70.0%"] < peak["adamw", "none", "0.0%"] < peak["adamw", "movement", "70.0%"]
    assert rows["adamwprune", "state", "70.0%"][-1].endswith("x")  # its mask update, in fused steps
    assert "gpt2: AdamW's state is" in out and "below AdamW + movement's" in out


@pytest.mark.parametrize("flags, complaint", [
    (["--model", "gpt2", "--batch-size", "0"], "--batch-size takes a whole number of at least 1"),
    (["--model", "gpt-tiny", "--context", "65"], "--context one from 1 to 64"),
    (["--batch-size", "2"], "--batch-size and --context shape a GPT's batch"),
    (["--model", "gpt2", "--amp", "bf16", "--device", "cpu"], "--amp bf16 is for --model gpt2 on CUDA")])
def test_memory_py_refuses_a_gpt_batch_it_cannot_measure(capsys, flags, complaint):
    with pytest.raises(SystemExit) as exit_info:
        memory.main(flags)
    assert exit_info.value.code == 2 and complaint in capsys.readouterr().err


def test_the_benchmark_rows_of_lenet5_hold_the_contract_before_and_after_pruning():
    rows = {(r["optimizer"], r["pruning"], r["phase"]): r for r in memory.benchmark("lenet5", torch.device("cpu"), 1)}
    weights = [p for p in LeNet5(1, 10, 28).parameters() if p.dim() >= 2]  # conv and linear
    steps = 4 * len(weights) / sum(p.numel() for p in weights)  # a float32 step count per tensor
    # by hand, bytes per prunable weight: Adam's m and v 8, AMSGrad's 12, SGD's momentum 4 (no step count);
    # pruning buffers: movement's score and mask 5, magnitude's mask 1; AdamWPrune at 70%: at most 12 * 0.3
    for (optimizer, pruning, phase), row in rows.items():
        moments = {"sgd": 4, "adamwadv": 12}.get(optimizer, 8) + (steps if optimizer != "sgd" else 0)
        if optimizer == "adamwprune" and phase == "pruned":
            assert 3.6 + steps - 0.25 < row["state_bytes_per_prunable"] <= 3.6 + steps + 0.005
        else:
            assert row["state_bytes_per_prunable"] == pytest.approx(moments, abs=0.006), (optimizer, phase)
        assert row["pruning_bytes_per_prunable"] == {"movement": 5, "magnitude": 1}.get(pruning, 0)
        assert (row["sparsity"] == pytest.approx(0.7, abs=0.001)) == (phase == "pruned")
        assert ("mask_update_fused_steps" in row) == (phase == "pruned") and row["vs_fused"] > 0
    peak = {key: row["peak_step_bytes"] for key, row in rows.items()}
    assert peak["adamwprune", "state", "pruned"] < peak["adamw", "none", "before"] < peak["adamw", "movement", "pruned"]


def test_a_gpt2_rig_that_does_not_fit_is_a_line_not_a_crash(monkeypatch, capsys):
    monkeypatch.setitem(GPT_SHAPES, "gpt2", REDUCED_GPT2)
    real_rig = memory.Rig

    def rig(model_name, optimizer, pruning, *args, **kwargs):
        if optimizer == "adamwadv":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")
        return real_rig(model_name, optimizer, pruning, *args, **kwargs)
    monkeypatch.setattr(memory, "Rig", rig)
    rows = list(memory.benchmark_alone("gpt2", torch.device("cpu"), repeats=1))
    failed = [row for row in rows if "error" in row]
    assert [(row["optimizer"], row["pruning"]) for row in failed] == [("adamwadv", "movement")]
    assert failed[0]["error"].startswith("does not fit in cpu memory (DefaultCPUAllocator")
    assert len(rows) == 10 and all("peak_step_bytes" in row for row in rows if row not in failed)


def test_a_storage_shared_by_views_is_counted_once():
    t = torch.zeros(1000)
    assert memory.tensor_bytes([t, t.view(10, 100), t[500:], t.clone()]) == 2 * 4000

# --- memory.py: the CPU peak tracker and the monitor ---


def test_tracker_sees_a_known_allocation_made_and_freed_inside():
    with memory.TensorMemoryTracker() as tracker:
        block = torch.ones(250_000)  # 1,000,000 bytes
        del block
        small = torch.ones(1000)  # 4,000 bytes, still alive at the end
    assert tracker.peak_bytes == 1_000_000
    assert tracker.live_bytes == 4000
    del small


def test_tracker_counts_existing_tensors_and_sees_them_freed():
    existing = [torch.ones(1000), torch.ones(2000)]
    with memory.TensorMemoryTracker(existing=existing) as tracker:
        assert tracker.live_bytes == 12_000
        existing.pop()  # frees 8,000 bytes
        block = torch.ones(500)
    assert tracker.peak_bytes == 12_000
    assert tracker.live_bytes == 4000 + 2000
    del block


def test_tracker_does_not_count_in_place_work_on_tensors_from_before():
    big = torch.zeros(1_000_000)
    with memory.TensorMemoryTracker() as tracker:
        big.add_(1)
        big.view(-1, 10).mul_(2)
    assert tracker.peak_bytes == 0


def test_monitor_samples_every_n_steps_and_peak_includes_activations():
    model = nn.Sequential(nn.Linear(100, 4000), nn.ReLU(), nn.Linear(4000, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = memory.MemoryMonitor("cpu", every=3)
    x = torch.randn(64, 100)
    for step in range(1, 10):
        with monitor.step(step, model, opt):
            opt.zero_grad(set_to_none=True)
            model(x).sum().backward()
            opt.step()
    report = monitor.report()
    assert [s["step"] for s in report["timeline"]] == [3, 6, 9]
    persistent = 2 * 4 * sum(p.numel() for p in model.parameters())  # parameters and gradients
    assert report["timeline"][-1]["allocated_bytes"] == persistent
    activations = 2 * 64 * 4000 * 4  # the hidden layer before and after ReLU, alive at once in forward
    assert report["peak_bytes"] >= persistent // 2 + activations  # the parameters, no gradients yet
    assert report["process_peak_rss_bytes"] > report["peak_bytes"]


@CUDA
def test_on_cuda_the_monitor_reports_the_allocators_peaks_allocated_and_reserved():
    device = torch.device("cuda")
    model = nn.Linear(100, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = memory.MemoryMonitor(device, every=1)
    block_bytes = 64 * 2 ** 20
    for step in (1, 2):
        with monitor.step(step, model, opt):
            scratch = torch.ones(block_bytes, dtype=torch.uint8, device=device)  # made and freed inside the step
            model(torch.randn(8, 100, device=device)).sum().backward()
            opt.step()
            del scratch
    report, sample = monitor.report(), monitor.timeline[-1]
    assert sample["allocated_bytes"] < block_bytes <= sample["step_peak_bytes"] <= sample["reserved_bytes"]
    assert block_bytes <= report["peak_bytes"] <= report["peak_reserved_bytes"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_benchmark_rig_reports_its_step_peak_above_its_state_and_reserved_memory_on_cuda_only(device):
    rig = memory.settled_rig("lenet5", "adamwprune", "state", 0.7, torch.device(device))
    if device == "cuda":
        torch.cuda.empty_cache()
    state_bytes = memory.tensor_bytes(memory.training_tensors(rig.model, rig.optimizer, rig.buffers()))
    activations = 128 * 6 * 28 * 28 * 4  # LeNet-5's first convolution's output for the batch of 128
    peak_bytes, reserved_bytes = rig.peak_step_bytes()
    assert peak_bytes >= state_bytes + activations
    assert reserved_bytes is None if device == "cpu" else reserved_bytes >= state_bytes + activations

# === models.py ===

# --- models ---

def test_lenet5_has_61706_parameters():
    assert count_parameters(LeNet5(1, 10, image_size=28)) == 61_706


def test_lenet5_flatten_size_follows_the_image_size():
    model = LeNet5(3, 10, image_size=32)
    assert count_parameters(model) == 83_126
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_has_11173962_parameters():
    model = ResNet18(3, 10)
    assert count_parameters(model) == 11_173_962
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

# --- the GPT ---

def unique_parameters(model):
    """Each tensor once, by identity, whatever parameters() does with shared ones."""
    every = [p for _, p in model.named_parameters(remove_duplicate=False)]  # wte.weight twice
    return sum(p.numel() for p in {id(p): p for p in every}.values())


def gpt_by_hand(vocab_size, block_size, n_layer, n_head, n_embd):
    """Parameters counted layer by layer, the token embedding once (lm_head shares it, without a bias)."""
    C = n_embd
    attention = (C * 3 * C + 3 * C) + (C * C + C)  # c_attn, c_proj
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)  # c_fc, c_proj
    block = 2 * C + attention + 2 * C + mlp  # ln_1, attn, ln_2, mlp
    return vocab_size * C + block_size * C + n_layer * block + 2 * C  # wte, wpe, blocks, ln_f


def test_gpt_parameter_counts_are_those_counted_by_hand_and_in_the_docstring():
    tiny = GPT(**GPT_SHAPES["gpt-tiny"])
    with torch.device("meta"):  # no memory for GPT-2's 124M parameters
        gpt2 = GPT(**GPT_SHAPES["gpt2"])
    assert unique_parameters(tiny) == gpt_by_hand(**GPT_SHAPES["gpt-tiny"]) == 809_856
    assert unique_parameters(gpt2) == gpt_by_hand(**GPT_SHAPES["gpt2"]) == 124_475_904
    assert count_parameters(gpt2) == 124_475_904  # model.parameters() counts the tied tensor once too
    assert "809,856" in GPT.__doc__ and "124,475,904" in GPT.__doc__
    import models
    assert "809,856" in models.__doc__ and "124,475,904" in models.__doc__


def test_gpt_lm_head_is_the_token_embedding_and_stays_one_tensor_through_a_step():
    torch.manual_seed(0)
    model = GPT(**GPT_SHAPES["gpt-tiny"])
    assert model.lm_head.weight is model.wte.weight and model.lm_head.bias is None
    before = model.wte.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 65, (2, 16))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    optimizer.step()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert not torch.equal(model.wte.weight, before)  # it moved, and lm_head with it


def test_gpt_changing_token_t_changes_no_logits_before_t():
    torch.manual_seed(0)
    model = GPT(**GPT_SHAPES["gpt-tiny"]).eval()
    idx = torch.randint(0, 65, (2, 40))
    t = 23
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 65
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :t], after[:, :t])  # the past cannot see the future
    assert (before[:, t:] - after[:, t:]).abs().amax(-1).min() > 0  # token t and those after it do see it


def test_gpt_a_sequence_longer_than_the_block_size_raises_naming_it():
    model = GPT(**GPT_SHAPES["gpt-tiny"])
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 65)
    with pytest.raises(ValueError, match=r"65 tokens.*block size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(vocab_size=65, block_size=8, n_layer=1, n_head=3, n_embd=16)


def test_gpt_learns_a_repeating_sequence_with_adamw():
    torch.manual_seed(0)
    model = GPT(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
    data = torch.arange(7).repeat(10)  # 0 1 2 3 4 5 6 0 1 ... : each token decides the next
    x, y = data[:32].unsqueeze(0), data[1:33].unsqueeze(0)  # (1, 32) inputs, targets one ahead
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(65)) < 0.2
    assert losses[-1] < losses[0] / 2


def test_gpt_tiny_starts_at_the_loss_of_a_uniform_guess_on_random_tokens():
    torch.manual_seed(0)
    model = GPT(**GPT_SHAPES["gpt-tiny"])
    idx = torch.randint(0, 65, (8, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - math.log(65)) < 0.1  # ln 65 = 4.17: GPT-2's init makes the logits near zero

# === train.py ===

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_dir():
    """Where the real Fashion-MNIST is: ./data (how .ci/gpu carries it to a GPU machine) or Debian's folder."""
    for directory in (os.path.join(HERE, "data"), FASHION_MNIST_DIR):
        if os.path.isfile(os.path.join(directory, "train-images-idx3-ubyte.gz")):
            return directory
    pytest.skip(f"Fashion-MNIST is in neither ./data nor {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")


TINY_TRAIN, TINY_TEST = 512, 256  # images in the synthetic MNIST-format data set


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def write_idx(path, tensor):
    """A uint8 tensor as a gzipped IDX file, written independently of train.read_idx."""
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A learnable MNIST look-alike in torchvision's layout: a bright 6x6 square whose place is the class."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, label in enumerate(labels.tolist()):
            row, col = 2 + 12 * (label // 5), 2 + 5 * (label % 5)
            images[i, row:row + 6, col:col + 6] += 180
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images.to(torch.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels.to(torch.uint8))
    return str(root)


def tiny_args(tiny_data, out, *flags):
    return ["--dataset", "mnist", "--data-dir", tiny_data, "--limit", str(TINY_TRAIN), "--epochs", "3",
            "--batch-size", "64", "--device", "cpu", "--out", str(out), *flags]


def tiny_run(tiny_data, out, *flags):
    train.main(tiny_args(tiny_data, out, *flags))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def numbers(results):
    """The results without timings, paths, versions and process RSS: what must repeat exactly."""
    config = {k: v for k, v in results["config"].items() if k not in ("out", "resume")}
    history = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in results["history"]]
    final = {k: v for k, v in results["final"].items() if k != "wall_seconds"}
    memory = {k: v for k, v in results["memory"].items() if k != "process_peak_rss_bytes"}  # the whole process's
    return config, history, final, results["sparsity_timeline"], memory


def stop_after_the_first_checkpoint(monkeypatch):
    """Ctrl-C right after train.py saved its first checkpoint."""
    real_save = train.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)


def run_until_the_first_checkpoint(monkeypatch, argv):
    """train.main(argv), stopped right after its first checkpoint; train.save_checkpoint is itself again."""
    real_save = train.save_checkpoint
    stop_after_the_first_checkpoint(monkeypatch)
    with pytest.raises(SystemExit):
        train.main(argv)
    monkeypatch.setattr(train, "save_checkpoint", real_save)


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err

# --- data ---

def test_read_idx_reads_the_shape_and_values_written(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", images)
    assert torch.equal(train.read_idx(str(tmp_path / "x.gz")), images)


def test_random_crop_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    shifts = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    out = train.random_crop_flip(images, shifts, flips)
    for image, (dy, dx), flip, got in zip(images, shifts.tolist(), flips, out):
        padded = torch.zeros(3, 16, 16, dtype=torch.uint8)
        padded[:, 4:12, 4:12] = image
        expected = padded[:, dy:dy + 8, dx:dx + 8]
        assert torch.equal(got, expected.flip(2) if flip else expected)


def test_batches_are_normalised_uint8_data_and_cover_every_image_once(tiny_data):
    config = train.parse_args(tiny_args(tiny_data, "unused"))
    data, _ = train.load_data(config, torch.device("cpu"))
    assert data.images.dtype == torch.uint8 and data.images.shape == (TINY_TRAIN, 1, 28, 28)
    batches = list(data.batches(100, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [100] * 5 + [12]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data.labels.tolist())
    x = batches[0][0]
    assert x.dtype == torch.float32 and -1 < x.min() < 0 < x.max()


def test_fashion_mnist_is_found_in_the_debian_package_dir(tmp_path):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} is missing (apt-get install dataset-fashion-mnist)")
    images_train, labels_train, images_test, labels_test = train.load_dataset("fashion-mnist", str(tmp_path))
    assert images_train.shape == (60000, 1, 28, 28) and images_test.shape == (10000, 1, 28, 28)
    assert sorted(labels_train.unique().tolist()) == list(range(10)) and len(labels_test) == 10000


@pytest.mark.parametrize("name, stored", [("cifar10", (5, 32, 32, 3)), ("mnist", (5, 28, 28))])
def test_a_torchvision_download_becomes_uint8_images_channels_first(tmp_path, monkeypatch, name, stored):
    import torchvision
    made = []

    class Downloaded:  # as torchvision's classes keep them: CIFAR-10 (N, H, W, C) numpy arrays, MNIST (N, H, W) tensors
        def __init__(self, root, train, download):
            made.append((root, train, download))
            seeded = torch.Generator().manual_seed(int(train))
            data = torch.randint(0, 256, stored, dtype=torch.uint8, generator=seeded)
            self.data = data.numpy() if len(stored) == 4 else data
            self.targets = list(range(5)) if train else [9, 8, 7, 6, 5]  # CIFAR-10: a list; MNIST: a tensor
            self.targets = self.targets if len(stored) == 4 else torch.tensor(self.targets)

    monkeypatch.setattr(torchvision.datasets, train.DATASETS[name].torchvision, Downloaded)
    images_train, labels_train, images_test, labels_test = train.load_dataset(name, str(tmp_path))
    assert made == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    for images, seed in ((images_train, 1), (images_test, 0)):
        data = torch.randint(0, 256, stored, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        by_hand = data.permute(0, 3, 1, 2) if len(stored) == 4 else data[:, None]  # (N, C, H, W)
        assert images.dtype == torch.uint8 and torch.equal(images, by_hand)
    assert labels_train.tolist() == list(range(5)) and labels_test.tolist() == [9, 8, 7, 6, 5]


def test_missing_data_exits_with_one_message_saying_what_to_do(tmp_path, monkeypatch, capsys):
    def offline(name, data_dir):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(train, "torchvision_download", offline)
    monkeypatch.setitem(train.SYSTEM_DATA_DIRS, "fashion-mnist", str(tmp_path / "not-installed"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--device", "cpu",
                    "--out", str(tmp_path / "run")])
    message = str(exit_info.value.code)
    assert message.startswith("error: could not load fashion-mnist") and "\n" not in message
    for hint in (str(tmp_path), "not-installed", "Name or service not known", "--data-dir",
                 "apt-get install dataset-fashion-mnist", "network"):
        assert hint in message
    assert "Traceback" not in capsys.readouterr().err

# --- command line ---

@pytest.mark.parametrize("flags, complaint", [
    (["--optimizer", "sgd", "--pruning", "state"], "--pruning state"),
    (["--optimizer", "adamwprune", "--pruning", "movement"], "prunes by itself"),
    (["--optimizer", "adamw", "--importance", "hybrid"], "--importance"),
    (["--optimizer", "adamw", "--sparsity", "0.5"], "--sparsity needs a pruning method"),
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--optimizer", "adamw", "--prune-every", "10"], "--prune-every"),
    (["--prune-end", "10000000"], "--prune-end"),
    (["--epochs", "0"], "--epochs: takes a whole number of at least 1, got '0'"),
    (["--batch-size", "x"], "--batch-size: takes a whole number of at least 1, got 'x'"),
    (["--lr", "-1"], "--lr: takes a positive number"),
    (["--lr", "inf"], "--lr: takes a positive number (not inf or nan), got 'inf'"),  # was: a diverged run, exit 0
    (["--lr", "nan"], "--lr: takes a positive number (not inf or nan), got 'nan'"),
    (["--device", "gpu0"], "--device: takes auto, cpu, cuda or cuda:N, got 'gpu0'"),
    (["--device", "cpu", "--amp", "bf16"], "--amp bf16 runs on CUDA only"),
    (["--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--compare", "--lr", "0.1"], "drop --lr"),
    (["--compare", "--optimizer", "sgd"], "drop --optimizer"),
    (["--compare", "--sparsity", "0"], "(0, 1) for a comparison"),
    (["--sparsity", "0.5,0.9"], "add --compare"),
    (["--sparsity", "half"], "--sparsity: takes a number"),
    (["--ablation"], "add --compare"),
    (["--plot", "text"], "add --compare"),
])
def test_bad_flags_stop_at_the_command_line_with_the_fix(capsys, flags, complaint):
    assert complaint in cli_error(capsys, flags)


def test_defaults_follow_the_model_and_optimizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no results of earlier runs in the default folders
    config = train.parse_args([])
    assert (config["dataset"], config["optimizer"], config["pruning"], config["sparsity"]) == (
        "fashion-mnist", "adamwprune", "state", 0.7)
    assert config["out"] == os.path.join("results", "lenet5-adamwprune-state-0.7")
    steps = 10 * math.ceil(60000 / 128)
    assert 0 < config["prune_start"] < config["prune_end"] < steps
    config = train.parse_args(["--model", "resnet18", "--optimizer", "sgd"])
    assert (config["dataset"], config["pruning"], config["sparsity"], config["lr"]) == ("cifar10", "none", 0.0, 0.03)

# --- runs ---

def test_tiny_run_writes_results_json_with_the_documented_keys(tiny_data, tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(train.os, "replace",
                        lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    results = tiny_run(tiny_data, tmp_path, "--optimizer", "adamw", "--pruning", "magnitude")
    documented = {"config", "history", "sparsity_timeline", "memory", "wall_seconds", "environment", "final"}
    assert documented <= set(results)
    assert set(results["final"]) == {"test_accuracy", "sparsity", "peak_memory_bytes", "peak_reserved_bytes",
                                     "wall_seconds", "pruned_file_bytes", "dense_file_bytes"}
    assert results["final"]["peak_reserved_bytes"] is None  # no caching allocator on the CPU
    assert {"python", "torch", "torchvision", "device"} <= set(results["environment"])
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "sparsity"} <= set(results["history"][0])
    # by hand: LeNet-5's weights, gradients, AdamW's m and v (4 B each) and the magnitude mask (1 B per weight
    # of 2+ dims) are alive at every step; a batch's activations add less than 16 MiB
    persistent_bytes = 16 * 61_706 + 1 * (61_706 - (6 + 16 + 120 + 84 + 10))
    assert persistent_bytes <= results["final"]["peak_memory_bytes"] < persistent_bytes + 16 * 2**20
    assert results["final"]["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert results["final"]["test_accuracy"] > 50  # the synthetic classes are easy
    # atomic: each file was renamed into place from a temporary file in the same directory
    targets = {os.path.basename(dst): src for src, dst in replaced}
    assert {"results.json", "checkpoint.pt", "model.pruned.pt"} <= set(targets)
    assert all(os.path.dirname(src) == str(tmp_path) for src in targets.values())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "model.pruned.pt", "results.json"]
    # the pruned model, smaller on disk: it loads back into the trained model's weights
    final, weights = results["final"], torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    compact = torch.load(tmp_path / "model.pruned.pt", weights_only=True)
    assert all(torch.equal(weights[name], tensor) for name, tensor in dense_state_dict(compact).items())
    assert final["pruned_file_bytes"] == os.path.getsize(tmp_path / "model.pruned.pt")
    assert final["pruned_file_bytes"] < 0.4 * final["dense_file_bytes"]


def test_same_seed_gives_identical_numbers_and_another_seed_does_not(tiny_data, tmp_path):
    first = tiny_run(tiny_data, tmp_path / "a", "--seed", "3")
    second = tiny_run(tiny_data, tmp_path / "b", "--seed", "3")
    other = tiny_run(tiny_data, tmp_path / "c", "--seed", "4")
    assert numbers(first) == numbers(second)
    assert numbers(first)[1] != numbers(other)[1]


@pytest.mark.parametrize("optimizer, pruning",
                         [("adamwprune", "state"), ("adamw", "movement"), ("adamwadv", "none")])
def test_resume_after_a_stop_ends_like_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch,
                                                            optimizer, pruning):
    flags = ("--optimizer", optimizer, "--pruning", pruning)
    uninterrupted = tiny_run(tiny_data, tmp_path / "whole", *flags)
    run_until_the_first_checkpoint(monkeypatch, tiny_args(tiny_data, tmp_path / "stopped", *flags))
    resumed = tiny_run(tiny_data, tmp_path / "stopped", *flags, "--resume")
    assert numbers(resumed) == numbers(uninterrupted)


def test_resume_refuses_a_checkpoint_made_with_other_flags_and_names_them_as_typed(tiny_data, tmp_path):
    tiny_run(tiny_data, tmp_path, "--optimizer", "adamw", "--pruning", "magnitude", "--sparsity", "0.7")
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_data, tmp_path, "--optimizer", "adamw", "--pruning", "magnitude",
                             "--sparsity", "0.5", "--lr", "0.01", "--resume"))
    message = str(exit_info.value.code)
    assert "(--sparsity 0.7 there, 0.5 now, --lr 0.001 there, 0.01 now)" in message
    assert "another --out" in message


def test_a_run_in_out_is_never_overwritten_without_resume(tiny_data, tmp_path, capsys):
    tiny_run(tiny_data, tmp_path, "--epochs", "1")
    complaint = cli_error(capsys, tiny_args(tiny_data, tmp_path, "--epochs", "1")).splitlines()[-1]
    assert complaint.endswith(f" error: {tmp_path} holds a run already (checkpoint.pt and results.json): "
                              "add --resume to continue it, pass another --out, or delete that folder")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adamwadv", "adamwspam", "adamwprune"])
def test_every_optimizer_learns_the_tiny_task(tiny_data, tmp_path, optimizer):
    results = tiny_run(tiny_data, tmp_path, "--optimizer", optimizer, "--pruning", "none")
    assert results["final"]["test_accuracy"] > 50 and results["final"]["sparsity"] == 0


def test_flags_reach_the_run(tiny_data, tmp_path):
    results = tiny_run(tiny_data, tmp_path, "--importance", "magnitude", "--sparsity", "0.5", "--lr", "0.002",
                       "--prune-start", "4", "--prune-end", "12", "--prune-every", "4", "--batch-size", "128")
    config = results["config"]
    assert (config["importance"], config["lr"], config["batch_size"]) == ("magnitude", 0.002, 128)
    timeline = {s["step"]: s["sparsity"] for s in results["sparsity_timeline"]}
    assert timeline[7] == 0  # the cubic schedule is at 0 on its first update, step 4
    assert timeline[8] == pytest.approx(0.5 * (1 - 0.5 ** 3), abs=1e-4)
    assert timeline[12] == pytest.approx(0.5, abs=1e-4)
    assert max(timeline) == 3 * TINY_TRAIN // 128  # 4 steps per epoch of 128 images


def test_dry_run_is_one_epoch_of_two_batches_written_beside_real_results(tiny_data, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second dry run overwrites the first
        train.main(["--dataset", "mnist", "--data-dir", tiny_data, "--device", "cpu", "--dry-run"])
        assert capsys.readouterr().out.count("\n") == 2  # an epoch line and the summary
    with open(os.path.join("results", "lenet5-adamwprune-state-0.7-dry-run", "results.json")) as f:
        results = json.load(f)
    assert len(results["history"]) == 1 and results["sparsity_timeline"][-1]["step"] == 2


def test_resnet18_trains_on_cifar_shaped_data(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)

    def fake_cifar(name, data_dir):
        images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (12,), generator=g)
        return [images[:8], labels[:8], images[8:], labels[8:]]

    monkeypatch.setattr(train, "load_dataset", fake_cifar)
    train.main(["--model", "resnet18", "--optimizer", "sgd", "--pruning", "movement", "--limit", "8",
                "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["config"]["dataset"] == "cifar10" and results["final"]["sparsity"] == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("flags, cosine", [
    (["--model", "resnet18", "--optimizer", "adamw"], True), (["--optimizer", "adamw"], False),
    (["--optimizer", "adamw", "--lr-schedule", "cosine"], True), (["--model", "resnet18", "--lr-schedule",
                                                                   "constant"], False),
    (["--optimizer", "adamwadv", "--lr-schedule", "constant"], True)], ids=str)
def test_the_lr_is_annealed_by_cosine_for_resnet18_and_adamwadv_and_constant_for_lenet5(flags, cosine):
    config = train.parse_args(flags + ["--device", "cpu"], writes=False)
    optimizer, scheduler, _ = train.make_optimizer(config, small_net(), total_steps=10)
    lrs = []
    for _ in range(10):
        train.update(config, small_net(), optimizer, scheduler, None)  # no gradients: nothing moves but the lr
        lrs.append(optimizer.param_groups[0]["lr"])
    lr = config["lr"]  # SGDR's cosine, by hand: lr (1 + cos(pi t / T)) / 2 after step t
    assert lrs == pytest.approx([lr * (1 + math.cos(math.pi * t / 10)) / 2 if cosine else lr for t in range(1, 11)])


@pytest.mark.parametrize("model, augmented", [("lenet5", False), ("resnet18", True)])
def test_resnet18_trains_on_random_crops_and_flips_and_lenet5_on_the_images_as_they_are(tiny_data, model,
                                                                                        augmented):
    config = train.parse_args(tiny_args(tiny_data, "unused", "--model", model), writes=False)
    data, test = train.load_data(config, torch.device("cpu"))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64]  # the epoch's first draw
    x, y = next(data.batches(64, torch.Generator().manual_seed(0)))
    plain = lambda images: (images.float() - data.mean) / data.std  # noqa: E731
    assert torch.equal(y, data.labels[order]) and torch.equal(x, plain(data.images[order])) != augmented
    assert torch.equal(next(test.batches(64))[0], plain(test.images[:64]))  # test images: never augmented


@CUDA
def test_on_cuda_resnet18_trains_with_amp_bf16_in_channels_last_and_records_the_allocators_peaks(tiny_data,
                                                                                                 tmp_path):
    results = tiny_run(tiny_data, tmp_path, "--model", "resnet18", "--device", "cuda", "--amp", "bf16",
                       "--epochs", "2")
    final, history = results["final"], results["history"]
    assert results["environment"]["device"] == torch.cuda.get_device_name()
    assert results["memory"]["source"].startswith("CUDA caching allocator")
    assert 11_173_962 * 4 < final["peak_memory_bytes"] <= final["peak_reserved_bytes"]  # fp32 weights, at least
    assert final["sparsity"] == pytest.approx(0.7, abs=1e-6) and history[-1]["train_loss"] < history[0]["train_loss"]
    weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    convolutions = [w for w in weights.values() if w.dim() == 4]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)


@CUDA
def test_on_cuda_a_run_after_a_larger_one_in_the_same_process_reports_its_own_peaks(tiny_data, tmp_path):
    flags = ("--device", "cuda", "--epochs", "1")
    big = tiny_run(tiny_data, tmp_path / "resnet18", "--model", "resnet18", *flags)["final"]
    small = tiny_run(tiny_data, tmp_path / "lenet5", *flags)["final"]  # as train.py --compare runs its rows
    assert big["peak_memory_bytes"] > 4 * 11_173_962 * 4  # ResNet-18's weights, gradients, m and v, at least
    assert small["peak_memory_bytes"] < 0.5 * big["peak_memory_bytes"]  # ResNet-18's run was freed
    assert small["peak_reserved_bytes"] < 0.5 * big["peak_reserved_bytes"]  # and its cached blocks went back


def test_progress_updates_one_line_on_a_terminal(tiny_data, capsys):
    config = train.parse_args(tiny_args(tiny_data, "unused"))
    state, data, _ = train.setup(config)
    train.train_epoch(state, data, 1, show_progress=True)
    out = capsys.readouterr().out
    assert out.startswith("\r") and "\n" not in out and f"[{TINY_TRAIN // 64}/{TINY_TRAIN // 64}]" in out
    assert "img/s" in out and "ETA" in out and "iB" in out


def test_data_path_benchmark_times_the_data_path_in_train_steps_only(tiny_data, monkeypatch):
    """With a delay added to every batch the data path serves and to every forward pass, a train
    step pays both and a bare step the forward only: the bare loop takes the same steps over
    batches gathered before the clock starts."""
    delay_seconds = 0.05
    real_batches, real_make_model = train.DeviceData.batches, train.make_model

    def slow_batches(self, *args):
        for batch in real_batches(self, *args):
            time.sleep(delay_seconds)
            yield batch

    def slow_model(config, device):
        model = real_make_model(config, device)
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(delay_seconds))
        return model

    monkeypatch.setattr(train.DeviceData, "batches", slow_batches)
    monkeypatch.setattr(train, "make_model", slow_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps of about a millisecond: no OpenMP thread waits on a busy core
    try:
        figures = memory.measure_data_path(tiny_args(tiny_data, "unused", "--batch-size", "8"), steps=4, repeats=2)
    finally:
        torch.set_num_threads(threads)
    assert delay_seconds <= figures["bare_step_seconds"] < 2 * delay_seconds
    assert 0.8 * delay_seconds < figures["train_step_seconds"] - figures["bare_step_seconds"] < 2 * delay_seconds

# --- pruning methods ---

def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))


@pytest.mark.parametrize("method", [train.MagnitudePruning, train.MovementPruning])
def test_pruning_methods_prune_the_cubic_schedule_by_hand_with_monotone_masks_and_zero_weights(method):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruning = method(model.parameters(), 0.7, prune_start=2, prune_end=20, prune_every=3)
    prunable = [model[0].weight, model[2].weight]
    assert pruning.params == prunable  # biases are not prunable
    previous, expected = [torch.ones_like(p, dtype=torch.bool) for p in prunable], 0
    for t in range(1, 26):
        F.cross_entropy(model(torch.randn(16, 20)), torch.randint(0, 5, (16,))).backward()
        pruning.observe()  # scores see this step's gradients
        optimizer.step()
        optimizer.zero_grad()
        pruning.step()
        if t in (2, 5, 8, 11, 14, 17, 20):  # the grid from prune_start every 3 steps, and prune_end
            expected = min(round(cubic(t, 0.7, 2, 20) * 750), 749)
        assert sum(int((p == 0).sum()) for p in prunable) == expected, t  # exactly, and only at updates
        for p, mask, before in zip(prunable, pruning.masks, previous):
            assert not (mask & ~before).any()  # nothing comes back
            assert (p[~mask] == 0).all()  # pruned weights are zero after every step
        previous = [m.clone() for m in pruning.masks]
    assert expected == round(0.7 * 750) == 525


def test_movement_score_accumulates_minus_gradient_times_weight():
    model = tiny_model()
    pruning = train.MovementPruning(model.parameters(), 0.5, prune_start=100, prune_end=200, prune_every=1)
    expected = torch.zeros_like(model[0].weight)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        expected -= model[0].weight.grad * model[0].weight
        pruning.observe()
        with torch.no_grad():
            model[0].weight.add_(0.1)
    assert torch.allclose(pruning.score[0], expected)
    buffers = pruning.buffers()  # by hand: a bool mask and a float32 score per prunable weight (750 of them)
    assert sorted(str(b.dtype) for b in buffers) == ["torch.bool"] * 2 + ["torch.float32"] * 2
    assert memory.tensor_bytes(buffers) == 750 * (1 + 4)


def test_pruning_state_dict_round_trips():
    model = tiny_model()
    pruning = train.MovementPruning(model.parameters(), 0.5, prune_start=1, prune_end=1, prune_every=1)
    F.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
    pruning.observe()
    pruning.step()
    copy = train.MovementPruning(tiny_model().parameters(), 0.5, prune_start=1, prune_end=1, prune_every=1)
    copy.load_state_dict(pruning.state_dict())
    assert copy.optimizer_step == 1
    assert all(torch.equal(a, b) for a, b in zip(copy.buffers(), pruning.buffers()))

# --- SPAM ---

def test_spam_without_spikes_or_resets_equals_adamw():
    model, reference = tiny_model(), tiny_model()
    spam = train.AdamWSPAM(model.parameters(), lr=1e-2, threshold=math.inf, reset_interval=10_000)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for _ in range(30):
        x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
        for net, opt in ((model, spam), (reference, adamw)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_spam_clips_a_spike_to_sqrt_threshold_times_v():
    w = torch.nn.Parameter(torch.zeros(3))
    spam = train.AdamWSPAM([w], lr=1e-3, weight_decay=0.0, threshold=5000)
    for _ in range(30):
        w.grad = torch.ones(3)
        spam.step()
    state = spam.state[w]
    exp_avg, exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    w.grad = torch.tensor([1e4, -1e4, 1.0])  # two spikes and a normal entry
    spam.step()
    bound = (5000 * exp_avg_sq).sqrt()
    clipped = torch.stack([bound[0], -bound[1], torch.tensor(1.0)])
    assert torch.allclose(state["exp_avg"], 0.9 * exp_avg + 0.1 * clipped)


def test_spam_resets_both_moments_every_reset_interval():
    w = torch.nn.Parameter(torch.zeros(2))
    spam = train.AdamWSPAM([w], lr=1e-3, reset_interval=5)
    for t in range(1, 6):
        w.grad = torch.full((2,), float(t))
        spam.step()
    state = spam.state[w]  # step 5 reset the moments, then took in its gradient only
    assert torch.allclose(state["exp_avg"], torch.full((2,), 0.1 * 5))
    assert torch.allclose(state["exp_avg_sq"], torch.full((2,), 0.001 * 25))


def test_spam_warms_the_step_up_by_its_cosine_after_each_reset():
    w = torch.nn.Parameter(torch.zeros(1))
    spam = train.AdamWSPAM([w], lr=1e-3, weight_decay=0.0, reset_interval=5, warmup_steps=3, clip_after=10**6)
    g, m, v = 2.0, 0.0, 0.0
    for t in range(1, 10):
        since = t % 5
        if since == 0:
            m = v = 0.0  # the reset
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        # by hand: the paper's cosine from 0.01 up to 1 over warmup_steps steps after a reset, 1 otherwise
        scale = 1 - 0.99 * (1 + math.cos(math.pi * since / 4)) / 2 if t >= 5 and since < 3 else 1.0
        expected = float(w.detach()) - 1e-3 * scale * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        w.grad = torch.full((1,), g)
        spam.step()
        assert float(w.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-9), t


# --- the real data set ---

def test_default_recipe_lenet5_adamwprune_at_70_percent_reaches_89_percent_on_fashion_mnist(tmp_path):
    """The default recipe (10 epochs, about a minute on 2 CPU cores); with the variance score, seeds 1-5 gave
    89.12-89.61% (README: the ablation)."""
    train.main(["--dataset", "fashion-mnist", "--data-dir", fashion_mnist_dir(), "--device", "cpu",
                "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        final = json.load(f)["final"]
    assert final["sparsity"] == pytest.approx(0.7, abs=1e-5)
    assert final["test_accuracy"] >= 89.0

# --- the GPT on Tiny Shakespeare ---

SHAKESPEARE_DIR = os.path.join(HERE, "data")  # .ci/run copies the text there (a git-ignored folder)
SHAKESPEARE = os.path.join(SHAKESPEARE_DIR, "tinyshakespeare.txt")
needs_shakespeare = pytest.mark.skipif(
    not os.path.exists(SHAKESPEARE), reason=f"no {SHAKESPEARE}: copy Tiny Shakespeare there (.ci/run does it "
    "from ../shared/data) or run `python train.py --model gpt` once online to download it")
SMALL_GPT = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65)  # mechanics, in seconds


def gpt_args(out, *flags, limit=96):
    """A GPT run on the real text: --limit 96 windows of 12 is 8 steps an epoch."""
    return ["--model", "gpt", "--data-dir", SHAKESPEARE_DIR, "--device", "cpu", "--limit", str(limit),
            "--epochs", "3", "--out", str(out), *flags]


def gpt_run(out, *flags, **kwargs):
    train.main(gpt_args(out, *flags, **kwargs))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture
def small_gpt(monkeypatch):
    monkeypatch.setitem(train.GPT_SHAPES, train.GPT_SHAPE, SMALL_GPT)


@needs_shakespeare
def test_the_text_is_its_65_characters_split_90_10_and_validated_on_windows_every_run_shares():
    with open(SHAKESPEARE, "rb") as f:
        text = f.read()
    tokens, vocabulary = train.load_text("shakespeare", SHAKESPEARE_DIR)
    assert len(vocabulary) == 65 and vocabulary == "".join(sorted(set(text.decode())))
    assert "".join(vocabulary[i] for i in tokens[:300].tolist()) == text[:300].decode()  # decodes back
    assert len(tokens) == 1_115_394
    config = train.parse_args(gpt_args("/tmp/unused", "--seed", "1"), writes=False)
    train_data, val = train.load_data(config, torch.device("cpu"))
    assert torch.equal(train_data.tokens, tokens[:1_003_854]) and torch.equal(val.tokens, tokens[1_003_854:])
    other = train.load_data({**config, "seed": 2}, torch.device("cpu"))[1]
    assert torch.equal(val.starts, other.starts) and len(val) == 96  # --limit 96: at most 96 windows
    assert len(train.load_data({**config, "limit": None}, torch.device("cpu"))[1]) == 480


def test_text_windows_are_followed_by_their_next_tokens_and_split_over_ranks():
    data = train.TextData(torch.arange(1000), context=8, windows=24)
    whole = list(data.batches(12, torch.Generator().manual_seed(0)))
    assert len(whole) == 2 and all(x.shape == y.shape == (12, 8) for x, y in whole)
    for x, y in whole:  # the tokens are their positions: a window is consecutive, its targets one on
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(12, 7, dtype=torch.int64)) and torch.equal(y, x + 1)
    parts = [list(data.batches(12, torch.Generator().manual_seed(0), rank, 2)) for rank in range(2)]
    for step, (x, _) in enumerate(whole):  # each rank takes its half of every batch
        assert torch.equal(torch.cat([parts[0][step][0], parts[1][step][0]]), x)
    assert max(int(x.max()) for x, _ in whole) <= 999 - 1  # the last window still has its next token


def test_a_text_failing_its_checksum_stops_naming_it_and_nothing_is_downloaded_over_it(tmp_path, monkeypatch):
    path = tmp_path / "tinyshakespeare.txt"
    path.write_text("To be, or not to be\n")
    monkeypatch.setattr(train.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(train.RunError) as error:
        train.load_text("shakespeare", str(tmp_path))
    assert str(path) in str(error.value) and "sha256" in str(error.value) and "replace it" in str(error.value)
    assert path.read_text() == "To be, or not to be\n"


def test_no_text_and_no_network_is_one_message_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise train.urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(train.urllib.request, "urlopen", offline)
    with pytest.raises(train.RunError) as error:
        train.load_text("shakespeare", str(tmp_path / "data"))
    message = str(error.value)
    assert str(tmp_path / "data" / "tinyshakespeare.txt") in message and "name resolution" in message
    assert "--data-dir" in message and "network" in message and not os.path.exists(tmp_path / "data")


@needs_shakespeare
def test_a_download_is_checked_then_written_whole_and_a_wrong_one_writes_nothing(tmp_path, monkeypatch):
    with open(SHAKESPEARE, "rb") as f:
        text = f.read()
    urls = []
    monkeypatch.setattr(train.urllib.request, "urlopen", lambda url, **k: urls.append(url) or io.BytesIO(text[:-1]))
    with pytest.raises(train.RunError, match="sha256"):
        train.load_text("shakespeare", str(tmp_path))
    assert os.listdir(tmp_path) == []  # a damaged download leaves no file
    monkeypatch.setattr(train.urllib.request, "urlopen", lambda url, **k: urls.append(url) or io.BytesIO(text))
    tokens, _ = train.load_text("shakespeare", str(tmp_path / "new"))
    assert (tmp_path / "new" / "tinyshakespeare.txt").read_bytes() == text and len(tokens) == len(text)
    assert urls[0].endswith("karpathy/char-rnn/master/data/tinyshakespeare/input.txt")


def test_warmup_cosine_is_nanogpts_schedule_by_hand():
    total = 2000
    assert train.warmup_cosine(0, total) == pytest.approx(1 / 101)  # nanoGPT: lr * (it + 1) / (warmup + 1)
    assert train.warmup_cosine(99, total) == pytest.approx(100 / 101)
    assert train.warmup_cosine(100, total) == pytest.approx(1.0)
    assert train.warmup_cosine(1050, total) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert train.warmup_cosine(total, total) == pytest.approx(0.1)  # min_lr = lr / 10


def test_the_gpt_recipe_is_nanogpts_two_groups_betas_and_clipping(small_gpt, monkeypatch):
    config = train.parse_args(["--model", "gpt", "--optimizer", "adamw", "--device", "cpu"], writes=False)
    assert (config["batch_size"], config["epochs"] * train.steps_per_epoch(config)) == (12, 2000)
    assert config["lr"] == 1e-3 and config["lr_schedule"] == "warmup-cosine"
    model = train.make_model(config, torch.device("cpu"))
    optimizer, scheduler, _ = train.make_optimizer(config, model, 2000)
    decayed, plain = optimizer.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert (decayed["weight_decay"], plain["weight_decay"], decayed["betas"]) == (0.1, 0.0, (0.9, 0.99))
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 101)  # the first step's, warming up
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm))
    train.update(config, model, optimizer, scheduler, None)
    assert clipped == [1.0]


@needs_shakespeare
@pytest.mark.parametrize("optimizer, pruning", [("adamwprune", "state"), ("adamw", "magnitude"),
                                                ("adamw", "movement"), ("sgd", "movement")])
def test_gpt_runs_prune_exactly_and_report_validation_loss(small_gpt, tmp_path, optimizer, pruning):
    results = gpt_run(tmp_path, "--optimizer", optimizer, "--pruning", pruning, "--sparsity", "0.5")
    assert results["metric"] == {"key": "val_loss", "label": "validation loss (nats per character)",
                                 "higher_is_better": False}
    final, history = results["final"], results["history"]
    assert final["val_loss"] == history[-1]["val_loss"] and final["val_perplexity"] == pytest.approx(
        math.exp(final["val_loss"]))
    assert [h["step"] for h in history] == [8, 16, 24] and "test_accuracy" not in final
    model = GPT(**SMALL_GPT)
    weights = torch.load(tmp_path / "model.pruned.pt", weights_only=True)
    model.load_state_dict(dense_state_dict(weights))
    kept = [p for p in model.parameters() if p.dim() >= 2]  # the tied embedding counted once
    n = sum(p.numel() for p in kept)
    assert sum(int((p == 0).sum()) for p in kept) == round(0.5 * n)  # exactly k = round(s N)
    assert final["sparsity"] == pytest.approx(round(0.5 * n) / n)


@needs_shakespeare
def test_a_gpt_run_resumed_after_a_stop_ends_like_an_uninterrupted_one(small_gpt, tmp_path, monkeypatch):
    uninterrupted = gpt_run(tmp_path / "whole")
    run_until_the_first_checkpoint(monkeypatch, gpt_args(tmp_path / "stopped"))
    resumed = gpt_run(tmp_path / "stopped", "--resume")
    assert numbers(resumed) == numbers(uninterrupted)


def test_the_gpt_and_the_image_models_refuse_each_others_data(capsys):
    assert "the GPT reads text (shakespeare)" in cli_error(capsys, ["--model", "gpt", "--dataset", "mnist"])
    assert "--model lenet5 does not take --dataset shakespeare" in cli_error(capsys, ["--dataset", "shakespeare"])


@needs_shakespeare
def test_a_short_real_gpt_run_learns_more_than_character_frequencies(tmp_path):
    """200 steps of gpt-tiny: the untrained model scores ln 65 = 4.17 nats, the training text's character
    frequencies 3.35 on the validation split; learning from context goes below both."""
    final = gpt_run(tmp_path, "--optimizer", "adamw", "--epochs", "2", limit=1200)["final"]
    assert final["val_loss"] < 2.9

# --- the comparison ---


def compare_args(tiny_data, out, *flags):
    return ["--compare", "--dataset", "mnist", "--data-dir", tiny_data, "--limit", str(TINY_TRAIN), "--epochs", "1",
            "--batch-size", "64", "--device", "cpu", "--out", str(out), *flags]


def test_compare_runs_every_row_and_resumes_where_it_stopped(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "comparison"
    real_run, started = train.train, []

    def run_then_stop_in_the_fourth_row(config):
        started.append(config["out"])
        if len(started) == 4:
            raise KeyboardInterrupt  # a stop part-way through the comparison
        return real_run(config)
    monkeypatch.setattr(train, "train", run_then_stop_in_the_fourth_row)
    with pytest.raises(SystemExit) as exit_info:
        train.main(compare_args(tiny_data, out))
    assert "run the same command again" in str(exit_info.value.code)
    with open(out / "comparison.json") as f:
        assert len(json.load(f)["rows"]) == 3  # what finished is saved
    started.clear()
    monkeypatch.setattr(train, "train", lambda config: started.append(config["out"]) or real_run(config))
    train.main(compare_args(tiny_data, out, "--plot", "both"))
    assert len(started) == 5  # the three finished rows were not run again
    with open(out / "comparison.json") as f:
        comparison = json.load(f)
    assert [r["name"] for r in comparison["rows"]] == [name for name, *_ in train.STUDY]
    for row in comparison["rows"]:
        assert row["sparsity_reached"] == pytest.approx(row["sparsity"], abs=1e-3)
        assert row["efficiency"] == pytest.approx(row["test_accuracy"] / row["peak_memory_mib"] * 100)
    with open(out / "comparison.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + len(train.STUDY)
    printed = capsys.readouterr().out
    assert "AdamWPrune + state" in printed and "peak MiB" in printed  # the table
    for name in ("comparison.svg", "memory_timeline.svg", "memory_vs_accuracy.svg"):
        ET.parse(out / name)


def test_an_ablation_sweep_runs_each_score_at_each_sparsity_and_the_dense_row_once(tiny_data, tmp_path):
    out = tmp_path / "ablation"
    train.main(compare_args(tiny_data, out, "--ablation", "--sparsity", "0.5,0.9"))
    with open(out / "comparison.json") as f:
        rows = json.load(f)["rows"]
    pruned = [(r["importance"], r["sparsity"]) for r in rows if r["pruning"] == "state"]
    assert sorted(pruned) == sorted((i, s) for i in ("hybrid", "variance", "momentum", "magnitude") for s in (0.5, 0.9))
    assert [r["sparsity"] for r in rows if r["pruning"] == "none"] == [0.0]
    assert os.path.exists(out / "accuracy_vs_sparsity.svg")


def test_a_comparison_refuses_rows_made_with_other_settings(tiny_data, tmp_path):
    out = tmp_path / "comparison"
    train.main(compare_args(tiny_data, out, "--ablation"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(compare_args(tiny_data, out, "--ablation", "--seed", "2"))
    assert "other settings" in str(exit_info.value.code) and "another --out" in str(exit_info.value.code)


def test_ctrl_c_stops_with_one_line_saying_how_to_continue(tiny_data, tmp_path, monkeypatch):
    real_save = train.save_checkpoint

    def save_then_interrupted(state, path):  # Ctrl-C after the first epoch was saved
        real_save(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", save_then_interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_data, tmp_path))
    assert "stopped" in str(exit_info.value.code) and "--resume" in str(exit_info.value.code)


def test_ctrl_c_before_the_first_checkpoint_says_nothing_is_saved(tiny_data, tmp_path, monkeypatch):
    def interrupted_while_writing(state, path):  # was: "finished epochs are saved" when none were
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", interrupted_while_writing)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tiny_data, tmp_path))
    message = str(exit_info.value.code)
    assert "stopped before the first epoch was saved" in message and "--resume" not in message


def test_sigterm_stops_a_run_with_the_same_stopped_line_as_ctrl_c(tiny_data, tmp_path):
    run = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                            *tiny_args(tiny_data, tmp_path, "--epochs", "200")], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "checkpoint.pt").exists() and run.poll() is None:
        time.sleep(0.1)
    run.terminate()  # was: killed without a word
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1 and "stopped: finished epochs are saved" in err and "--resume" in err

# --- faults a user hits: two runs in one folder, a full disk, a diverged run, a moved folder ---

def test_a_second_run_in_a_folder_in_use_stops_at_once_naming_the_process(tiny_data, tmp_path, capsys):
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                              *tiny_args(tiny_data, tmp_path, "--epochs", "8", "--seed", "1")], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "checkpoint.pt").exists() and first.poll() is None:
        time.sleep(0.1)
    message = one_line_exit(capsys, lambda: train.main(tiny_args(tiny_data, tmp_path, "--seed", "2", "--resume")))
    assert message == f"error: {tmp_path} is in use by another run (process {first.pid}): wait for it to end, " \
                      "or pass another --out"
    assert first.wait(timeout=300) == 0, first.stderr.read()
    with open(tmp_path / "results.json") as f:  # was: the other run's numbers, or a crash
        results = json.load(f)
    assert results["config"]["seed"] == 1 and len(results["history"]) == 8
    tiny_run(tiny_data, tmp_path / "next", "--epochs", "1")  # the lock went with the process


@pytest.mark.parametrize("out", ["a regular file", "a folder that cannot be written"])
def test_an_out_that_cannot_be_written_stops_before_the_data_is_read(tmp_path, capsys, out):
    if out == "a regular file":
        path = tmp_path / "results"
        path.write_text("not a folder")
    else:
        path = tmp_path / "read-only" / "run"
        path.parent.mkdir()
        immutable = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path.parent)],
                                                              capture_output=True).returncode == 0
        if not immutable:  # immutable: even root cannot write there
            path.parent.chmod(0o500)
            if os.geteuid() == 0:
                pytest.skip("root writes anywhere, and chattr +i cannot make a folder immutable here")
    try:  # a --data-dir without data: the error must come from --out, before any data is looked for
        message = one_line_exit(capsys, lambda: train.main(["--data-dir", str(tmp_path / "no-data"), "--out",
                                                            str(path)]))
    finally:
        if out != "a regular file":
            if immutable:
                subprocess.run(["chattr", "-i", str(path.parent)], capture_output=True)
            path.parent.chmod(0o700)
    assert message.startswith(f"error: cannot write in --out {path}: ") and message.endswith("pass another --out")


def mounted_tmpfs(folder, size):
    """A tmpfs of `size` mounted at `folder`, or None where this machine does not allow it."""
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        return None
    return folder


def test_a_full_disk_is_one_line_the_temporary_file_goes_and_resume_continues(tiny_data, tmp_path, monkeypatch,
                                                                              capsys):
    disk = mounted_tmpfs(tmp_path / "disk", "1100k")  # one LeNet-5 checkpoint fits, a second beside it does not
    out = (disk or tmp_path / "disk") / "run"
    if disk is None:  # no tmpfs here (not root, or no mount): the second checkpoint's write fails as a full one does
        real_save, saves = torch.save, []

        def save_on_a_full_disk(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                f.write(b"part of a checkpoint")
                raise RuntimeError("unexpected pos") from OSError(28, "No space left on device")
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    try:
        message = one_line_exit(capsys, lambda: train.main(tiny_args(tiny_data, out, "--optimizer", "adamw")))
        assert message.startswith(f"error: cannot write {out / 'checkpoint.pt'}: no space left on device; ")
        assert "make room, then add --resume to the same command to continue" in message
        assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # was: a .tmp file that kept the disk full
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the earlier one, whole
        monkeypatch.undo()
        shutil.copytree(out, tmp_path / "roomy")  # there is room now
    finally:
        if disk:
            subprocess.run(["umount", str(disk)], check=True)
    results = tiny_run(tiny_data, tmp_path / "roomy", "--optimizer", "adamw", "--resume")
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]


@pytest.mark.parametrize("flags", [["--optimizer", "sgd", "--lr", "1e6"], ["--optimizer", "adamw", "--lr", "1e6"]])
def test_a_diverged_run_stops_with_one_line_and_a_non_zero_exit(tiny_data, tmp_path, capsys, flags):
    message = one_line_exit(capsys, lambda: train.main(tiny_args(tiny_data, tmp_path, *flags)))
    assert re.fullmatch(r"error: the training loss is (nan|inf) from step \d+ \(epoch 1\) on: the run diverged; "
                        r"lower --lr \(it is 1e\+06\)\. Earlier checkpoints stay", message), message
    assert not os.path.exists(tmp_path / "results.json")  # was: exit 0, 10% accuracy and NaN in results.json


def test_results_json_holds_null_where_a_number_is_not_finite():
    text = plot.finite_json({"loss": math.nan, "history": [{"a": math.inf, "b": -math.inf, "c": 1.5}]})
    assert json.loads(text) == {"loss": None, "history": [{"a": None, "b": None, "c": 1.5}]}
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


def test_a_moved_folder_resumes_by_its_new_name_with_a_trailing_slash_or_a_relative_path(tiny_data, tmp_path,
                                                                                         monkeypatch):
    stop_after_the_first_checkpoint(monkeypatch)
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_data, tmp_path / "run", "--epochs", "3"))
    monkeypatch.undo()
    shutil.move(tmp_path / "run", tmp_path / "moved")  # was: "made with other settings (--out ...)"
    monkeypatch.chdir(tmp_path)
    results = tiny_run(tiny_data, "moved/", "--epochs", "3", "--resume")
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_that_version_ran(tiny_data, tmp_path, monkeypatch):
    stop_after_the_first_checkpoint(monkeypatch)
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_data, tmp_path, "--epochs", "2"))
    monkeypatch.undo()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("lr_schedule", "fsdp"):  # settings train.py gained later: that version ran constant, unsharded
        del saved["config"][key]
    torch.save(saved, tmp_path / "checkpoint.pt")
    results = tiny_run(tiny_data, tmp_path, "--epochs", "2", "--resume")  # was: "--lr-schedule unset there"
    assert [h["epoch"] for h in results["history"]] == [1, 2]


def test_images_and_labels_files_of_different_lengths_stop_with_one_line(tiny_data, tmp_path, capsys):
    data = tmp_path / "MNIST" / "raw"
    shutil.copytree(os.path.join(tiny_data, "MNIST", "raw"), data)
    images = train.read_idx(str(data / "train-images-idx3-ubyte.gz"))[:100]  # 100 images beside 512 labels
    write_idx(data / "train-images-idx3-ubyte.gz", images)
    message = one_line_exit(capsys, lambda: train.main(tiny_args(str(tmp_path), tmp_path / "run")))
    assert message == (f"error: mnist in {tmp_path}: its training images file holds 100 images, its labels file "
                       f"{TINY_TRAIN}: re-copy them")  # was: IndexError


def test_fewer_training_images_than_the_data_set_has_stop_with_one_line_naming_the_limit(tiny_data, tmp_path,
                                                                                        capsys):
    argv = tiny_args(tiny_data, tmp_path / "run")
    del argv[argv.index("--limit"):argv.index("--limit") + 2]  # MNIST's schedule is laid out for 60,000
    message = one_line_exit(capsys, lambda: train.main(argv))
    assert message == (f"error: mnist in {tiny_data} has {TINY_TRAIN} training images, not 60000: replace the "
                       f"files, or pass --limit {TINY_TRAIN}")
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("device, complaint", [("foo", "--device foo: not a device; use cpu, cuda or cuda:N"),
                                               ("meta", "--device meta: the benchmark measures cpu or cuda only")])
def test_memory_py_refuses_a_device_it_cannot_measure_with_one_line(capsys, device, complaint):
    with pytest.raises(SystemExit) as exit_info:  # was: a traceback
        memory.main(["--device", device])
    assert exit_info.value.code == 2 and complaint in capsys.readouterr().err


# --- damaged files: one line that names the file, what is wrong with it and what to do; nothing touched ---

def files_in(folder):
    """{path below folder: bytes} of every file there."""
    return {os.path.relpath(os.path.join(directory, name), folder): open(os.path.join(directory, name), "rb").read()
            for directory, _, names in os.walk(folder) for name in names}


def one_line_exit(capsys, run):
    """The line `run` exits with; nothing printed on the way is a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    message, printed = str(exit_info.value.code), capsys.readouterr()
    assert "\n" not in message and "Traceback" not in printed.out + printed.err
    return message


def torch_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def checkpoint_without(*keys):
    return lambda data: torch_bytes({key: value for key, value in torch.load(io.BytesIO(data)).items()
                                     if key not in keys})


UNREADABLE_CHECKPOINT = "cannot be read (cut short, damaged, or no PyTorch file)"
CHECKPOINT_DAMAGE = {  # name: (damage(the file's bytes) -> the damaged file's bytes, what the line says is wrong)
    "garbage": (lambda data: random.Random(0).randbytes(len(data)), UNREADABLE_CHECKPOINT),
    "cut short": (lambda data: data[:len(data) // 2], UNREADABLE_CHECKPOINT),
    "empty": (lambda data: b"", UNREADABLE_CHECKPOINT),
    "another program's": (lambda data: torch_bytes({"epoch": 1, "model": LeNet5(1, 10, 28).state_dict()}),
                          "is no train.py checkpoint: it lacks config, step, wall_seconds, history, sparsity_timeline, "
                          "memory_timeline, world_size, optimizer, scheduler, pruning, rng"),
    "lacking keys": (checkpoint_without("optimizer", "rng"), "is no train.py checkpoint: it lacks optimizer, rng"),
}


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory):
    """The folder of a finished one-epoch run: checkpoint.pt and results.json."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tiny_run(tiny_data, out, "--epochs", "1")
    return out


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_resume_from_a_damaged_checkpoint_stops_with_one_line_and_touches_no_file(finished_run, tiny_data, tmp_path,
                                                                                 capsys, damage):
    out, (damaged, what) = tmp_path / "run", CHECKPOINT_DAMAGE[damage]
    shutil.copytree(finished_run, out)
    (out / "checkpoint.pt").write_bytes(damaged((out / "checkpoint.pt").read_bytes()))
    before = files_in(out)
    message = one_line_exit(capsys, lambda: train.main(tiny_args(tiny_data, out, "--epochs", "1", "--resume")))
    assert message == (f"error: --resume: {out / 'checkpoint.pt'} {what}: delete it and start afresh without --resume, "
                       "or pass another --out")
    assert files_in(out) == before


def inside_gzip(damage):
    return lambda data: gzip.compress(damage(gzip.decompress(data)))


IDX_DAMAGE = {  # name: (file in MNIST/raw, damage(the bytes of that file's .gz) -> its bytes, what the line says is wrong)
    "wrong magic": ("train-images-idx3-ubyte.gz", inside_gzip(lambda idx: b"\x00\x00\x0d" + idx[3:]),
                    "is not an IDX file of uint8 values"),
    "cut short": ("train-images-idx3-ubyte.gz", inside_gzip(lambda idx: idx[:16 + 1000]),
                  "is cut short or damaged (header [512, 28, 28], 1000 values)"),
    "cut short, not gzipped": ("t10k-images-idx3-ubyte", lambda data: gzip.decompress(data)[:-784],
                               "is cut short or damaged (header [256, 28, 28], 199920 values)"),
    "a header that disagrees": ("t10k-labels-idx1-ubyte.gz", inside_gzip(lambda idx: idx[:4] + bytes([0, 0, 1, 44])
                                                                          + idx[8:]),
                                "is cut short or damaged (header [300], 256 values)"),
    "gzip stream cut short": ("train-labels-idx1-ubyte.gz", lambda data: data[:len(data) // 2],
                              "cannot be read (Compressed file ended before the end-of-stream marker was reached)"),
    "no gzip at all": ("train-labels-idx1-ubyte.gz", lambda data: b"no gzip here",
                       "cannot be read (Not a gzipped file (b'no'))"),
}


@pytest.mark.parametrize("damage", IDX_DAMAGE)
def test_a_damaged_idx_file_stops_the_run_with_one_line_and_touches_no_file(tiny_data, tmp_path, capsys, damage):
    data, (name, damaged, what) = tmp_path / "data", IDX_DAMAGE[damage]
    shutil.copytree(tiny_data, data)
    raw = data / "MNIST" / "raw"
    (raw / name).write_bytes(damaged((raw / name.removesuffix(".gz")).with_suffix(".gz").read_bytes()))
    before = files_in(data)
    message = one_line_exit(capsys, lambda: train.main(tiny_args(str(data), tmp_path / "run")))
    assert message == f"error: {raw / name} {what}: re-copy the data set"
    assert files_in(data) == before and not os.path.exists(tmp_path / "run")


JSON_DAMAGE = {  # name: (damage(the file's bytes) -> the damaged file's bytes, how the line's "what is wrong" starts)
    "garbage": (lambda data: b"\x00" * len(data), "cannot be read as JSON (Expecting value: line 1 column 1 (char 0))"),
    "cut short": (lambda data: data[:len(data) // 2], "cannot be read as JSON ("),
    "not UTF-8": (lambda data: b"\xff" + data,
                  "cannot be read as JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    "lacking keys": (lambda data: json.dumps({k: v for k, v in json.loads(data).items() if k not in ("final", "history")})
                     .encode(), "lacks history, final.test_accuracy, final.sparsity, final.peak_memory_bytes, "
                                "final.wall_seconds"),
}


@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_a_comparison_with_a_damaged_row_stops_with_one_line_before_it_writes_anything(tiny_data, tmp_path, capsys,
                                                                                         damage):
    out, (damaged, what) = tmp_path / "comparison", JSON_DAMAGE[damage]
    train.main(compare_args(tiny_data, out))
    row = out / json.loads((out / "comparison.json").read_text())["rows"][3]["results_dir"]
    (row / "results.json").write_bytes(damaged((row / "results.json").read_bytes()))
    before = files_in(out)
    message = one_line_exit(capsys, lambda: train.main(compare_args(tiny_data, out)))
    assert message.startswith(f"error: {row / 'results.json'} {what}")
    assert message.endswith(f": delete that row's folder {row} and rerun the comparison")
    assert files_in(out) == before  # the comparison's files, and every row's results and checkpoint


PLOT_DAMAGE = {  # name: (file below the comparison's folder, its damage, what the line says is wrong, how it ends)
    **{f"comparison.json: {name}": ("comparison.json", damaged, what, "remake it with `python train.py --compare --out "
                                                                    "{}`")
       for name, (damaged, what) in list(JSON_DAMAGE.items())[:3]},
    "comparison.json: lacking rows": ("comparison.json", lambda data: json.dumps({"model": "lenet5"}).encode(),
                                      "lacks rows", "remake it with `python train.py --compare --out {}`"),
    **{f"a row's results.json: {name}": (os.path.join("lenet5-adam-movement-0.7", "results.json"), damaged, what,
                                        "delete that row's folder {}/lenet5-adam-movement-0.7 and rerun the comparison")
       for name, (damaged, what) in JSON_DAMAGE.items()},
}


@pytest.mark.parametrize("damage", PLOT_DAMAGE)
def test_plot_py_on_a_damaged_file_exits_2_with_one_line_and_writes_nothing(tmp_path, damage):
    name, damaged, what, fix = PLOT_DAMAGE[damage]
    directory = make_comparison(tmp_path)
    path = os.path.join(directory, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damaged(data))
    before = files_in(directory)
    done = subprocess.run([sys.executable, "plot.py", directory], capture_output=True, text=True, cwd=HERE)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"plot.py: error: {path} {what}") and done.stderr.count("\n") == 1
    assert done.stderr.endswith(f": {fix.format(directory)}\n")
    assert files_in(directory) == before


def test_a_crash_mid_write_leaves_the_old_file_and_a_temporary_one_that_the_next_write_removes(tiny_data, tmp_path,
                                                                                                 monkeypatch):
    class Killed(Exception):
        pass

    real_save = train.save_checkpoint

    def save_then_stop(state, path):  # a run stopped after its first epoch
        real_save(state, path)
        raise Killed

    def die_half_way(f):  # a crash in the middle of a write
        f.write(b"half a file")
        raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Killed):
        train.main(tiny_args(tiny_data, tmp_path, "--epochs", "2"))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    for name in ("checkpoint.pt", "results.json"):
        with pytest.raises(Killed):
            plot.write_atomic(str(tmp_path / name), die_half_way, binary=True)
    left = sorted(os.listdir(tmp_path))
    assert left[0] == "checkpoint.pt" and (tmp_path / "checkpoint.pt").read_bytes() == checkpoint  # the old one, whole
    assert [name.split(".tmp")[0].rsplit(".", 1)[0] for name in left[1:]] == ["checkpoint.pt", "results.json"]
    results = tiny_run(tiny_data, tmp_path, "--epochs", "2", "--resume")  # reads checkpoint.pt, not the .tmp
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "model.pruned.pt", "results.json"]


def test_a_write_removes_the_temporary_files_of_its_own_file_only(tmp_path):
    leftovers = ["checkpoint.pt.a1b2.tmp", "checkpoint.rank1.pt.c3d4.tmp", "results.json.e5f6.tmp"]
    for name in leftovers:  # checkpoint.rank1.pt's: under torchrun --fsdp, rank 1 may be writing it right now
        (tmp_path / name).write_bytes(b"half a file")
    plot.write_atomic(str(tmp_path / "checkpoint.pt"), lambda f: f.write(b"whole"), binary=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"] + leftovers[1:]
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"whole"


# --- several processes: FSDP2 shards and DDP replicas (2 ranks on gloo, fork-started) ---


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_rank(rank, world_size, port, fn, args):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def on_two_ranks(fn, *args):
    """Run fn(rank, *args) in two processes joined by a gloo group; an error in one fails the test."""
    torch.multiprocessing.start_processes(_on_rank, args=(2, free_port(), fn, args), nprocs=2,
                                          start_method="fork")


def uneven_net():
    """33 rows split 17/16, and a last layer of one row: rank 1's shard of it is empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 33), nn.ReLU(), nn.Linear(33, 7), nn.ReLU(), nn.Linear(7, 1))


def sharded(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (2,))  # torch's default mesh would be on a GPU, where there is one
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_steps(model, opt, steps, start=0):
    for t in range(start, steps):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(t))  # the same batch on every rank
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


PRUNING = dict(lr=1e-2, sparsity=0.7, prune_start=2, prune_end=8, prune_every=2)


def _prunes_like_one_process(rank, out):
    reference = uneven_net()
    reference_opt = AdamWPrune(reference.parameters(), **PRUNING)
    train_steps(reference, reference_opt, 12)
    model = sharded(uneven_net())
    opt = AdamWPrune(model.parameters(), **PRUNING)
    train_steps(model, opt, 12)
    assert model[4].weight.to_local().numel() == (7 if rank == 0 else 0)  # the empty shard
    for p, q in zip(model.parameters(), reference.parameters()):
        full = p.full_tensor()
        assert torch.equal(full == 0, q == 0), "the same weights are pruned"
        assert torch.allclose(full, q, atol=1e-6)
    torch.save({"state_bytes": memory.optimizer_state_bytes(opt),
                "reference_bytes": memory.optimizer_state_bytes(reference_opt)}, out / f"rank{rank}.pt")


def test_fsdp2_prunes_exactly_the_weights_one_process_prunes_with_state_split_over_ranks(tmp_path):
    on_two_ranks(_prunes_like_one_process, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one_process_bytes = ranks[0]["reference_bytes"]
    assert sum(r["state_bytes"] for r in ranks) <= one_process_bytes + 2 * 4 * 6  # + a step per shard
    assert all(r["state_bytes"] < 0.6 * one_process_bytes for r in ranks)


def _memory_py_fsdp_figures(rank, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them: train.wrapped shards only then
    per_rank, one_process, prunable = memory.sharded_state_bytes("lenet5", torch.device("cpu"))
    if rank == 0:
        torch.save({"per_rank": per_rank, "one_process": one_process, "prunable": prunable}, out / "figures.pt")


def test_memory_py_fsdp_splits_lenet5s_state_over_the_ranks_as_one_process_holds_it(tmp_path):
    on_two_ranks(_memory_py_fsdp_figures, tmp_path)  # the README's FSDP2 table: memory.py --fsdp
    figures = torch.load(tmp_path / "figures.pt")
    per_rank, one_process = figures["per_rank"], figures["one_process"]
    assert figures["prunable"] == 61706 - (6 + 16 + 120 + 84 + 10)  # LeNet-5's weights less its biases
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran: the same sums, so the same masks
    try:
        rig = memory.Rig("lenet5", "adamwprune", "state", 0.7, torch.device("cpu"))
        for _ in range(2):
            rig.train_step()
    finally:
        torch.set_num_threads(threads)
    by_hand = 0  # from the weights' zeros: past a third pruned, 12 B a kept weight (position, m, v); else 8 B each
    for p in rig.model.parameters():
        zeros = int((p == 0).sum())
        by_hand += 4 + (12 * (p.numel() - zeros) if p.dim() >= 2 and zeros > p.numel() / 3 else 8 * p.numel())
    assert one_process == by_hand
    assert sum(per_rank) == one_process + 4 * 10  # the same state, and a 4-byte step per tensor on each rank
    assert all(0.4 < bytes_ / one_process < 0.6 for bytes_ in per_rank)


def _ties_cross_ranks_in_row_order(rank):
    layer = nn.Linear(10, 9, bias=False)  # rows 0-4 on rank 0, 5-8 on rank 1
    with torch.no_grad():
        layer.weight.fill_(0.5)  # every score equal: ties decide everything
    model = sharded(nn.Sequential(layer))
    opt = AdamWPrune(model.parameters(), lr=0.0, weight_decay=0.0, sparsity=0.6, prune_start=1, prune_end=1)
    model[0].weight.grad = torch.distributed.tensor.zeros(9, 10, device_mesh=model[0].weight.device_mesh,
                                                          placements=model[0].weight.placements)
    opt.step()
    pruned = (model[0].weight.full_tensor() == 0).flatten()
    assert torch.equal(pruned.nonzero().flatten(), torch.arange(54))  # the first 54 in row order


def test_fsdp2_breaks_ties_in_the_order_one_process_would():
    on_two_ranks(_ties_cross_ranks_in_row_order)


def _resume(rank, out):
    model = sharded(uneven_net())
    opt = AdamWPrune(model.parameters(), **PRUNING)
    train_steps(model, opt, 14)
    uninterrupted = [p.full_tensor() for p in model.parameters()]
    model = sharded(uneven_net())
    opt = AdamWPrune(model.parameters(), **PRUNING)
    train_steps(model, opt, 6)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / f"rank{rank}.pt")
    model = sharded(uneven_net())
    opt = AdamWPrune(model.parameters(), **PRUNING)
    saved = torch.load(out / f"rank{rank}.pt", weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    train_steps(model, opt, 14, start=6)
    for p, q in zip(model.parameters(), uninterrupted):
        assert torch.equal(p.full_tensor(), q)
    torch.distributed.barrier()  # both files written
    other_ranks = torch.load(out / f"rank{1 - rank}.pt", weights_only=False)["optimizer"]
    with pytest.raises(RuntimeError, match="each rank saves and loads its own optimizer.state_dict"):
        opt.load_state_dict(other_ranks)


def test_fsdp2_resumes_bit_identically_from_each_ranks_state_dict_and_refuses_another_ranks(tmp_path):
    on_two_ranks(_resume, tmp_path)


def test_a_sharded_state_dict_loaded_at_another_world_size_is_refused(tmp_path):
    on_two_ranks(_resume, tmp_path)
    model = uneven_net()  # one process, no shards: the mesh check does not apply, the shapes do
    saved = torch.load(tmp_path / "rank0.pt", weights_only=False)["optimizer"]
    opt = AdamWPrune(model.parameters(), **PRUNING)
    with pytest.raises(RuntimeError, match="each rank saves and loads its own optimizer.state_dict"):
        opt.load_state_dict(saved)


def _replicas_disagree(rank):
    model = small_net(seed=rank)  # not replicas: each rank starts from other weights
    opt = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=1, prune_end=1,
                     check_replicas=torch.distributed.group.WORLD)
    random_grads(model.parameters(), 0)
    with pytest.raises(RuntimeError, match="replicas disagree on the mask after step 1"):
        opt.step()
    same = small_net(seed=0)
    opt = AdamWPrune(same.parameters(), sparsity=0.5, prune_start=1, prune_end=1,
                     check_replicas=torch.distributed.group.WORLD)
    random_grads(same.parameters(), 0)
    opt.step()  # identical replicas pass the check


def test_the_replica_check_raises_when_ddp_ranks_disagree():
    on_two_ranks(_replicas_disagree)

# --- train.py under torchrun: 2 processes on gloo, each in the environment torchrun gives it ---
LENET5_PRUNABLE = 150 + 2400 + 48000 + 10080 + 840  # the weights of its 2 convolutions and 3 linear layers


def _train_py_as_rank(rank, port, argv, results_dir, stop_at_epoch):
    """train.main(argv) as rank `rank` of 2; saves how it ended and, per model trained, which
    prunable weights are zero (this rank's shards under FSDP2)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    models, real_setup, real_evaluate, epochs = [], train.setup, train.evaluate, []

    def setup(config):
        made = real_setup(config)
        models.append(made[0].model)
        return made

    def evaluate(*args):  # a stop (Ctrl-C) in epoch `stop_at_epoch`, on every rank
        epochs.append(1)
        if len(epochs) == stop_at_epoch:
            raise KeyboardInterrupt
        return real_evaluate(*args)
    train.setup, train.evaluate, exit_code = setup, evaluate, 0
    try:
        train.main(argv)
    except SystemExit as stop:
        exit_code = stop.code
    zeros = [[local(p) == 0 for p in model.parameters() if p.dim() >= 2] for model in models]
    torch.save({"zeros": zeros, "exit_code": exit_code}, os.path.join(results_dir, f"rank{rank}.pt"))


def train_py_on_two_ranks(results_dir, argv, stop_at_epoch=None):
    """[rank 0's, rank 1's] exit code and zero weights, as _train_py_as_rank saves them."""
    torch.multiprocessing.start_processes(_train_py_as_rank, args=(free_port(), argv, str(results_dir), stop_at_epoch),
                                          nprocs=2, start_method="fork")
    return [torch.load(os.path.join(results_dir, f"rank{rank}.pt")) for rank in range(2)]


def pruned_count(zeros_of_each_rank, sharded):
    """Zero prunable weights of a model: the sum over FSDP2's shards, or one DDP replica's count."""
    counts = [sum(int(z.sum()) for z in zeros) for zeros in zeros_of_each_rank]
    return sum(counts) if sharded else counts[0]


def test_the_ranks_slices_of_each_batch_make_up_the_one_process_batch(tiny_data):
    config = train.parse_args(tiny_args(tiny_data, "unused"))
    data, _ = train.load_data(config, torch.device("cpu"))
    data.augment = True  # every rank draws the crops and flips of the whole batch
    whole = list(data.batches(170, torch.Generator().manual_seed(0)))  # 512 images: the last batch has 2
    parts = [list(data.batches(170, torch.Generator().manual_seed(0), rank, 3)) for rank in range(3)]
    assert [len(part[-1][1]) for part in parts] == [0, 1, 1]  # an empty slice
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([part[i][0] for part in parts]), x)
        assert torch.equal(torch.cat([part[i][1] for part in parts]), y)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_prune_exactly_write_once_and_match_one_process(tiny_data, tmp_path, fsdp):
    flags = ["--limit", "449"] + (["--fsdp"] if fsdp else [])  # 7 batches of 64, then 1 image: rank 0's slice is empty
    ranks = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "two", *flags))
    assert [r["exit_code"] for r in ranks] == [0, 0]
    [zeros0], [zeros1] = ranks[0]["zeros"], ranks[1]["zeros"]
    assert pruned_count([zeros0, zeros1], fsdp) == round(0.7 * LENET5_PRUNABLE)  # exact, over the whole model
    if not fsdp:
        assert all(torch.equal(a, b) for a, b in zip(zeros0, zeros1)), "the replicas prune the same weights"
    written = {"checkpoint.pt", "model.pruned.pt", "results.json"} | ({"checkpoint.rank1.pt"} if fsdp else set())
    assert set(os.listdir(tmp_path / "two")) == written  # one results.json; under FSDP2 a checkpoint per rank
    pruned_model = dense_state_dict(torch.load(tmp_path / "two" / "model.pruned.pt", weights_only=True))  # gathered
    assert sum(int((w == 0).sum()) for w in pruned_model.values() if w.dim() >= 2) == round(0.7 * LENET5_PRUNABLE)
    with open(tmp_path / "two" / "results.json") as f:
        two = json.load(f)
    assert {k: two["environment"][k] for k in ("world_size", "backend", "sharded")} == {
        "world_size": 2, "backend": "gloo", "sharded": fsdp}
    assert "largest of 2 ranks" in two["memory"]["per_rank"]
    one = tiny_run(tiny_data, tmp_path / "one", "--limit", "449")
    assert two["final"]["sparsity"] == one["final"]["sparsity"]
    assert two["final"]["test_accuracy"] == pytest.approx(one["final"]["test_accuracy"], abs=0.5)  # < 2 images


@needs_shakespeare
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_the_gpt_under_torchrun_prunes_exactly_and_counts_its_sparsity_once_per_weight(small_gpt, tmp_path, fsdp):
    out = tmp_path / "two"
    ranks = train_py_on_two_ranks(tmp_path, gpt_args(out, "--epochs", "2", *(["--fsdp"] if fsdp else [])))
    assert [r["exit_code"] for r in ranks] == [0, 0]
    prunable = 32 * 96 + 32 * 32 + 2 * 32 * 128 + 65 * 32 + 16 * 32  # SMALL_GPT's 2-D tensors, the tied one once
    assert pruned_count([ranks[0]["zeros"][0], ranks[1]["zeros"][0]], fsdp) == round(0.5 * prunable)
    with open(out / "results.json") as f:
        results = json.load(f)
    exact = round(0.5 * prunable) / prunable  # FSDP2 gathers the root's own tensors (the embeddings) for an
    assert results["final"]["sparsity"] == pytest.approx(exact)  # evaluation: counted once each all the same
    assert results["history"][-1]["sparsity"] == pytest.approx(exact)  # past --prune-end


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_every_optimizer_and_pruning_method_of_a_comparison_runs_under_torchrun(tiny_data, tmp_path, fsdp):
    out = tmp_path / "comparison"
    ranks = train_py_on_two_ranks(tmp_path, compare_args(tiny_data, out, *(["--fsdp"] if fsdp else [])))
    assert [r["exit_code"] for r in ranks] == [0, 0]
    with open(out / "comparison.json") as f:
        comparison = json.load(f)
    assert [row["name"] for row in comparison["rows"]] == [name for name, *_ in train.STUDY]
    assert comparison["environment"]["world_size"] == 2 and comparison["environment"]["sharded"] == fsdp
    for row, zeros0, zeros1 in zip(comparison["rows"], ranks[0]["zeros"], ranks[1]["zeros"]):
        assert pruned_count([zeros0, zeros1], fsdp) == round(row["sparsity"] * LENET5_PRUNABLE), row["name"]
        if not fsdp:
            assert all(torch.equal(a, b) for a, b in zip(zeros0, zeros1)), row["name"]
        assert row["test_accuracy"] > 20, row["name"]  # it learned: chance is 10%


def numbers_but_memory(results):
    """numbers(results) without memory: on the CPU a process's first step measures apart (DDP's gradient
    buckets and FSDP2's set-up are made in it), and a resumed run has a first step of its own."""
    config, history, final, sparsity_timeline, _ = numbers(results)
    return config, history, {k: v for k, v in final.items() if k != "peak_memory_bytes"}, sparsity_timeline


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_resume_at_the_same_world_size_ends_like_the_uninterrupted_run_and_another_is_refused(tiny_data, tmp_path,
                                                                                                fsdp):
    flags = ["--optimizer", "adamw", "--pruning", "movement"] + (["--fsdp"] if fsdp else [])
    whole = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "whole", *flags))
    assert [r["exit_code"] for r in whole] == [0, 0]
    stopped = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "stopped", *flags), stop_at_epoch=2)
    assert "add --resume" in stopped[0]["exit_code"] and stopped[1]["exit_code"] == 1  # only rank 0 says it
    if fsdp:  # rank 1's file from another epoch, as a stop while the files are written leaves them: both refuse
        shutil.copy(tmp_path / "stopped" / "checkpoint.rank1.pt", tmp_path / "rank1-epoch1.pt")
        shutil.copy(tmp_path / "whole" / "checkpoint.rank1.pt", tmp_path / "stopped" / "checkpoint.rank1.pt")
        refused = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "stopped", *flags, "--resume"))
        assert "end at epochs 1 to 3" in refused[0]["exit_code"] and refused[1]["exit_code"] == 1
        shutil.copy(tmp_path / "rank1-epoch1.pt", tmp_path / "stopped" / "checkpoint.rank1.pt")
    resumed = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "stopped", *flags, "--resume"))
    assert [r["exit_code"] for r in resumed] == [0, 0]
    with open(tmp_path / "whole" / "results.json") as f, open(tmp_path / "stopped" / "results.json") as g:
        assert numbers_but_memory(json.load(g)) == numbers_but_memory(json.load(f))
    with pytest.raises(SystemExit) as exit_info:  # one process, where two made the checkpoint
        train.main(tiny_args(tiny_data, tmp_path / "stopped", *flags[:4], "--resume"))
    message = str(exit_info.value.code)
    assert "made by 2 process(es), this run has 1" in message and "torchrun --nproc-per-node 2" in message
    tiny_run(tiny_data, tmp_path / "one", *flags[:4])  # and two processes, where one made it
    refused = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, tmp_path / "one", *flags, "--resume"))
    assert "made by 1 process(es), this run has 2" in refused[0]["exit_code"] and refused[1]["exit_code"] == 1


def test_under_fsdp_a_damaged_checkpoint_of_any_rank_stops_every_rank_and_rank_0_says_which(tiny_data, tmp_path):
    out, flags = tmp_path / "run", ["--epochs", "1", "--fsdp"]
    assert [r["exit_code"] for r in train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, out, *flags))] == [0, 0]
    for name, what in [("checkpoint.rank1.pt", "rank 1 cannot read checkpoint.rank1.pt"),
                       ("checkpoint.pt", f"{out / 'checkpoint.pt'} {UNREADABLE_CHECKPOINT}")]:
        intact = (out / name).read_bytes()
        (out / name).write_bytes(intact[:len(intact) // 2])
        before = files_in(out)
        ranks = train_py_on_two_ranks(tmp_path, tiny_args(tiny_data, out, *flags, "--resume"))
        assert ranks[0]["exit_code"] == (f"error: --resume: {what}: delete it and start afresh without --resume, "
                                         "or pass another --out")
        assert ranks[1]["exit_code"] == 1 and files_in(out) == before
        (out / name).write_bytes(intact)


def _baseline_replicas_disagree(rank):
    model = small_net(seed=rank)  # not replicas: each rank starts from other weights
    pruning = train.MagnitudePruning(model.parameters(), 0.5, prune_start=1, prune_end=1, prune_every=1,
                                     check_replicas=torch.distributed.group.WORLD)
    with pytest.raises(RuntimeError, match="replicas disagree on the mask after step 1"):
        pruning.step()
    same = small_net(seed=0)
    pruning = train.MagnitudePruning(same.parameters(), 0.5, prune_start=1, prune_end=1, prune_every=1,
                                     check_replicas=torch.distributed.group.WORLD)
    pruning.step()  # identical replicas pass the check


def test_the_baselines_replica_check_raises_when_ddp_ranks_disagree():
    on_two_ranks(_baseline_replicas_disagree)


@pytest.mark.parametrize("world_size, flags, complaint", [
    ("2", ["--batch-size", "63"], "--batch-size is the global batch, split evenly over the 2 processes: use a "
                                  "multiple of 2, such as 62"),
    ("1", ["--fsdp"], "--fsdp needs several processes: torchrun --nproc-per-node 2 train.py --fsdp"),
])
def test_flags_that_do_not_fit_the_processes_stop_at_the_command_line(capsys, monkeypatch, world_size, flags,
                                                                      complaint):
    monkeypatch.setenv("WORLD_SIZE", world_size)  # as torchrun sets it
    assert complaint in cli_error(capsys, flags)


def test_under_torchrun_only_rank_0_prints_a_command_line_error_and_every_rank_exits_with_2(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, says in [("0", True), ("1", False)]:
        monkeypatch.setenv("RANK", rank)
        assert ("--batch-size is the global batch" in cli_error(capsys, ["--batch-size", "63"])) == says
        with pytest.raises(SystemExit):
            train.parse_args(["--help"])
        assert ("--sparsity S" in capsys.readouterr().out) == says

# === plot.py ===

SVG = "{http://www.w3.org/2000/svg}"
STUDY = [  # name, optimizer, pruning, final accuracy (%), training-state bytes per weight (CPU)
    ("SGD + movement", "sgd", "movement", 88.4, 16),
    ("Adam + movement", "adam", "movement", 88.9, 24),
    ("AdamW + movement", "adamw", "movement", 89.0, 24),
    ("AdamWAdv + movement", "adamwadv", "movement", 89.2, 28),
    ("AdamW-SPAM + movement", "adamwspam", "movement", 88.8, 24),
    ("AdamWPrune + state", "adamwprune", "state", 89.3, 16),
    ("AdamW (dense)", "adamw", "none", 89.6, 16),
    ("AdamW + magnitude", "adamw", "magnitude", 88.7, 16),
]
WEIGHTS = 61706  # LeNet-5's parameters


def make_results(optimizer, pruning, sparsity, accuracy, bytes_per_weight, epochs, steps, rng):
    """One row's results.json: curves that rise and fall like a real run's, cubic sparsity, CPU memory."""
    history = [{"epoch": e, "train_loss": 0.28 + 0.5 * math.exp(-e / 2) + rng.uniform(0, 0.01),
                "train_accuracy": accuracy + 2 - 12 * math.exp(-e / 2),
                "test_loss": 0.3 + 0.4 * math.exp(-e / 2), "test_accuracy": accuracy - 9 * math.exp(-e / 2.2)
                + rng.uniform(-0.2, 0.2) * (e < epochs), "sparsity": 0.0, "epoch_seconds": 12.0}
               for e in range(1, epochs + 1)]
    start, end = steps // 10, 6 * steps // 10
    timeline, memory = [], []
    for step in range(0, steps + 1, 2):
        t = min(1.0, max(0.0, (step - start) / (end - start)))
        s = sparsity * (1 - (1 - t) ** 3) if pruning != "none" else 0.0
        state = bytes_per_weight - (8 * s if pruning == "state" and s > 0.25 else 0)
        timeline.append({"step": step, "sparsity": s})
        memory.append({"step": step, "allocated_bytes": int(WEIGHTS * state + 40000), "reserved_bytes": 0})
    for h in history:
        h["sparsity"] = timeline[min(len(timeline) - 1, h["epoch"] * len(timeline) // epochs)]["sparsity"]
    peak = max(m["allocated_bytes"] for m in memory)
    return {"config": {"model": "lenet5", "dataset": "fashion-mnist", "optimizer": optimizer, "pruning": pruning,
                       "sparsity": sparsity, "epochs": epochs},
            "history": history, "sparsity_timeline": timeline,
            "memory": {"device": "cpu", "source": "persistent training state", "peak_bytes": peak,
                       "mean_bytes": sum(m["allocated_bytes"] for m in memory) / len(memory), "timeline": memory},
            "final": {"test_accuracy": history[-1]["test_accuracy"], "sparsity": sparsity,
                      "peak_memory_bytes": peak, "wall_seconds": 120.0},
            "wall_seconds": 120.0, "environment": {"python": "3.11.7", "torch": "2.14.1"}}


def make_comparison(directory, study=STUDY, sparsities=(0.7,), epochs=10, steps=400, missing=()):
    """Write comparison.json and one results.json per row into `directory`; rows named in `missing` get none."""
    rng, rows = random.Random(1), []
    for name, optimizer, pruning, accuracy, bytes_per_weight in study:
        for sparsity in ([0.0] if pruning == "none" else sparsities):
            run = f"lenet5-{optimizer}-{pruning}-{sparsity}"
            results = make_results(optimizer, pruning, sparsity, accuracy - 4 * sparsity ** 4, bytes_per_weight,
                                   epochs, steps, rng)
            peak_mib = results["memory"]["peak_bytes"] / 2 ** 20
            rows.append({"name": name, "optimizer": optimizer, "pruning": pruning, "sparsity": sparsity,
                         "results_dir": run, "test_accuracy": results["final"]["test_accuracy"],
                         "peak_memory_mib": peak_mib, "mean_memory_mib": results["memory"]["mean_bytes"] / 2 ** 20,
                         "efficiency": 100 * results["final"]["test_accuracy"] / peak_mib,
                         "sparsity_reached": sparsity, "wall_seconds": 120.0})
            if name not in missing:
                os.makedirs(os.path.join(directory, run), exist_ok=True)
                with open(os.path.join(directory, run, "results.json"), "w") as f:
                    json.dump(results, f)
    comparison = {"model": "lenet5", "dataset": "fashion-mnist", "epochs": epochs, "seed": 1,
                  "sparsities": list(sparsities), "rows": rows,
                  "environment": {"python": "3.11.7", "torch": "2.14.1", "device": "cpu (x86_64, 2 threads)"}}
    with open(os.path.join(directory, "comparison.json"), "w") as f:
        json.dump(comparison, f)
    return str(directory)


def svg_texts(root):
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def drawn_colours(root, tag):
    return {e.get("stroke") if tag == "polyline" else e.get("fill") for e in root.iter(SVG + tag)}


def test_every_svg_parses_and_its_title_names_model_dataset_and_sparsity(tmp_path):
    paths = plot.render_svgs(make_comparison(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["comparison.svg", "memory_timeline.svg",
                                                          "memory_vs_accuracy.svg"]
    for path in paths:
        root = ET.parse(path).getroot()
        assert root.tag == SVG + "svg" and root.get("viewBox") and root.get("width") and root.get("height")
        assert any(t.startswith("LeNet-5 on Fashion-MNIST, 70% sparsity") for t in svg_texts(root)), path


def test_every_row_is_in_the_legend_and_drawn_in_its_colour(tmp_path):
    root = ET.parse(plot.render_svgs(make_comparison(tmp_path))[0]).getroot()
    styles = plot.styles_of([{"name": name} for name, *_ in STUDY])
    texts = svg_texts(root)
    for name, *_ in STUDY:
        assert texts.count(name) >= 3  # legend, accuracy bars, memory bars
        rows_drawn = [e for e in root.iter() if e.get("data-row") == name]
        assert {e.tag for e in rows_drawn} == {SVG + "polyline", SVG + "rect"}
        assert styles[name]["colour"] in {e.get("stroke") for e in rows_drawn} & {e.get("fill") for e in rows_drawn}
    assert len({s["colour"] for s in styles.values()}) == len({s["dash"] for s in styles.values()}) == len(STUDY)


def test_row_names_are_xml_escaped(tmp_path):
    study = [("A<B & \"C\" 'D'",) + STUDY[0][1:]] + STUDY[1:]
    for path in plot.render_svgs(make_comparison(tmp_path, study)):
        assert "A<B & \"C\" 'D'" in svg_texts(ET.parse(path).getroot())


def test_accuracy_vs_sparsity_is_drawn_only_for_a_sweep(tmp_path):
    single, sweep = tmp_path / "single", tmp_path / "sweep"
    single.mkdir(), sweep.mkdir()
    assert not any(p.endswith("accuracy_vs_sparsity.svg") for p in plot.render_svgs(make_comparison(single)))
    paths = plot.render_svgs(make_comparison(sweep, sparsities=(0.5, 0.7, 0.9)))
    root = ET.parse(sweep / "accuracy_vs_sparsity.svg").getroot()
    assert "LeNet-5 on Fashion-MNIST, 50% to 90% sparsity: accuracy vs sparsity" in svg_texts(root)
    lines = {e.get("data-row"): e.get("points").split() for e in root.iter(SVG + "polyline")}
    assert len(lines["AdamWPrune + state"]) == 3 and len(lines["AdamW (dense)"]) == 2
    assert len(paths) == 4


def test_sweep_figures_show_the_highest_sparsity(tmp_path):
    plot.render_svgs(make_comparison(tmp_path, sparsities=(0.5, 0.9)))
    root = ET.parse(tmp_path / "comparison.svg").getroot()
    assert "LeNet-5 on Fashion-MNIST, 90% sparsity" in svg_texts(root)
    bars = [e for e in root.iter(SVG + "rect") if e.get("data-row") == "AdamWPrune + state"]
    assert len(bars) == 3  # final accuracy, peak memory, efficiency: at 90% only
    assert f"{plot.load_comparison(str(tmp_path))[0]['rows'][-1]['efficiency']:.0f}" in svg_texts(root)


def test_a_row_without_results_keeps_its_bars_and_gets_a_note(tmp_path):
    directory = make_comparison(tmp_path, missing=("Adam + movement",))
    comparison, results = plot.load_comparison(directory)
    assert len(results) == len(STUDY) - 1 and "Adam + movement" not in results
    root = ET.parse(plot.render_svgs(directory)[0]).getroot()
    assert {e.tag for e in root.iter() if e.get("data-row") == "Adam + movement"} == {SVG + "rect"}
    assert any("no readable results.json for Adam + movement" in t for t in svg_texts(root))
    assert "no readable results.json for Adam + movement" in plot.text_report(directory)


def test_cli_rerenders_from_saved_results(tmp_path):
    directory = make_comparison(tmp_path)
    done = subprocess.run([sys.executable, "plot.py", directory], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(plot.__file__)))
    assert done.returncode == 0, done.stderr
    assert sorted(f for f in os.listdir(directory) if not os.path.isdir(os.path.join(directory, f))) == [
        "comparison.json", "comparison.svg", "memory_timeline.svg", "memory_vs_accuracy.svg"]  # no .tmp left
    assert "AdamWPrune + state" in done.stdout and "final test accuracy (%)" in done.stdout


def test_cli_says_what_is_missing_and_how_to_make_it_and_exits_2(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    make_comparison(broken)
    comparison = json.loads((broken / "comparison.json").read_text())
    del comparison["rows"][3]["efficiency"]
    (broken / "comparison.json").write_text(json.dumps(comparison))
    for directory, missing in [(tmp_path / "nowhere", "no directory"), (tmp_path, "has no comparison.json"),
                               (broken, "row 3 has no usable 'efficiency'")]:
        done = subprocess.run([sys.executable, "plot.py", str(directory)], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(plot.__file__)))
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert missing in done.stderr and f"python train.py --compare --out {directory}" in done.stderr


def test_text_report_names_every_row_within_100_columns(tmp_path):
    missing = ("Adam + movement", "AdamW-SPAM + movement")  # a note naming six rows: longer than 100 columns
    report = plot.text_report(make_comparison(tmp_path, sparsities=(0.5, 0.7, 0.9), missing=missing))
    for name, *_ in STUDY:
        assert name in report
    assert "AdamWPrune + state @ 50%" in report and "final test accuracy (%) per sparsity" in report
    assert "AdamW-SPAM + movement @ 90%: curves left out" in " ".join(report.split())
    assert max(len(line) for line in report.splitlines()) <= 100
    assert "█" in report and "▁" in report


def test_a_cuda_comparison_adds_the_reserved_peak_to_the_table_within_100_columns(tmp_path):
    directory = make_comparison(tmp_path)
    assert "reserved" not in plot.text_report(directory)  # the CPU has no caching allocator
    with open(tmp_path / "comparison.json") as f:
        comparison = json.load(f)
    for i, row in enumerate(comparison["rows"]):
        row["peak_reserved_mib"] = 1000.0 + i  # as train.py --compare writes a CUDA run's rows
    with open(tmp_path / "comparison.json", "w") as f:
        json.dump(comparison, f)
    table = plot.text_report(directory).splitlines()[-len(STUDY) - 1:]
    assert table[0].split()[:5] == ["row", "sparsity", "test", "acc", "peak"] and "reserved" in table[0].split()
    assert [line.split()[-5] for line in table[1:]] == [f"{1000 + i}" for i in range(len(STUDY))]
    assert max(len(line) for line in table) <= 100


def test_ascii_report_is_pure_ascii_even_for_unicode_names(tmp_path):
    study = [("AdamW – ünïcode",) + STUDY[0][1:]] + STUDY[1:]
    report = plot.text_report(make_comparison(tmp_path, study), ascii=True)
    assert report.isascii() and "#" in report and "AdamW ? " in report


def test_cli_falls_back_to_ascii_where_stdout_cannot_encode_unicode(tmp_path):
    done = subprocess.run([sys.executable, "plot.py", make_comparison(tmp_path), "--plot", "text"],
                          capture_output=True, cwd=os.path.dirname(os.path.abspath(plot.__file__)),
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0 and done.stdout.isascii() and b"#" in done.stdout
    assert not os.path.exists(os.path.join(tmp_path, "comparison.svg"))


def test_result_files_are_written_atomically_and_readable_by_others(tmp_path):
    path = tmp_path / "results.json"
    plot.write_atomic(str(path), lambda f: json.dump({"a": 1}, f))
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def write_ablation(directory, accuracies):
    """comparison.json of an ablation: accuracies {(importance, sparsity): test accuracy}."""
    rows = [{"name": f"AdamWPrune, {importance}", "importance": importance, "sparsity": sparsity,
             "results_dir": f"row-{importance}-{sparsity}", "test_accuracy": accuracy, "peak_memory_mib": 8.0,
             "efficiency": accuracy / 8.0 * 100} for (importance, sparsity), accuracy in accuracies.items()]
    os.makedirs(directory)
    with open(os.path.join(directory, "comparison.json"), "w") as f:
        json.dump({"rows": rows}, f)
    return str(directory)


@pytest.mark.parametrize("magnitude_lead, chosen", [(0.05, "variance"), (0.5, "magnitude")])
def test_the_default_score_is_the_best_state_score_unless_magnitude_leads_by_two_standard_errors(
        tmp_path, magnitude_lead, chosen):
    noise = [0.1, -0.1, 0.2, -0.2, 0.0]  # per seed, on magnitude only: the difference's standard error
    folders = []
    for seed, wobble in enumerate(noise):
        accuracies = {}
        for sparsity, base in ((0.7, 89.5), (0.9, 89.0)):
            accuracies.update({("variance", sparsity): base, ("hybrid", sparsity): base - 0.3,
                               ("momentum", sparsity): base - 0.2,
                               ("magnitude", sparsity): base + magnitude_lead + wobble})
        folders.append(write_ablation(tmp_path / f"seed{seed}", accuracies))
    lines, default = plot.score_decision(folders)
    standard_error = statistics.stdev(noise) / math.sqrt(5)  # 0.071: two of them, 0.14
    assert default == chosen
    assert f"{magnitude_lead:+.2f} ± {standard_error:.2f} points" in lines[-1] and f"default is {chosen}" in lines[-1]
    assert lines[1].startswith("hybrid") and "89.20 ± 0.00" in lines[1]  # (89.5 - 0.3) at 70%


def test_the_score_rule_needs_the_same_rows_on_several_seeds(tmp_path, capsys):
    one = write_ablation(tmp_path / "one", {("magnitude", 0.7): 89.0, ("variance", 0.7): 89.1})
    with pytest.raises(SystemExit):
        plot.main(["--scores", one])
    assert "at least two seeds" in capsys.readouterr().err


def test_nice_ticks_are_round_and_cover_the_range():
    for low, high in [(0, 1), (78.3, 89.6), (0, 4690), (0.93, 1.27), (-3, 7), (5, 5), (0, 0), (1e-4, 3e-4)]:
        ticks = plot.nice_ticks(low, high)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 12
        assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5)), (low, high, ticks)
        assert all(abs((b - a) - step) < 1e-9 * max(1, step) for a, b in zip(ticks, ticks[1:]))

# === .ci/gpu ===

# --- .ci/gpu: the checks that need a GPU, smoke-tested on the CPU ---

GPU_SCRIPT_FILES = ["comparison.csv", "comparison.json", "comparison.svg", "log.txt", "memory.txt",
                    "memory_timeline.svg", "memory_vs_accuracy.svg", "runs.tar.gz"]


def run_gpu_script(*args, **env):
    return subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, **env})


def test_the_gpu_script_smoke_runs_every_step_on_the_cpu_into_8_files(tiny_data, tmp_path):
    fashion = tmp_path / "data" / "FashionMNIST" / "raw"  # the tiny data set, under Fashion-MNIST's name
    shutil.copytree(os.path.join(tiny_data, "MNIST", "raw"), fashion)
    out = tmp_path / "out"
    done = run_gpu_script("--smoke", "--data-dir", str(tmp_path / "data"), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == GPU_SCRIPT_FILES and all(os.path.isfile(out / name) for name in GPU_SCRIPT_FILES)
    log = (out / "log.txt").read_text()
    assert log == done.stdout and "FAILED" not in log  # everything printed, in the log
    assert all(f"=== {i}/4 " in log for i in range(1, 5))
    assert "skipped" in log or torch.cuda.is_available()  # step 1 collected the CUDA cases, which skip on the CPU
    # dense AdamW and AdamWPrune ran first, where the comparison then found them
    assert log.count("done before, in") == 2 and "--- AdamW (dense), sparsity 0%: done before" in log
    assert "reserved" in (out / "memory.txt").read_text() and "adamwprune + state" in log
    with open(out / "comparison.json") as f:
        comparison = json.load(f)
    assert (comparison["model"], comparison["dataset"], len(comparison["rows"])) == ("resnet18", "fashion-mnist", 8)
    with tarfile.open(out / "runs.tar.gz") as runs:
        assert sorted(os.path.dirname(name) for name in runs.getnames()) == sorted(
            row["results_dir"] for row in comparison["rows"])
    verdicts = [line for line in log.splitlines() if line.startswith(("met ", "NOT MET "))]
    assert len(verdicts) == 4 and "dense AdamW" in verdicts[0]


def test_the_gpu_script_stopped_by_a_time_limit_hands_back_the_rows_done(tiny_data, tmp_path):
    shutil.copytree(os.path.join(tiny_data, "MNIST", "raw"), tmp_path / "data" / "FashionMNIST" / "raw")
    out = tmp_path / "out"
    script = subprocess.Popen(["bash", os.path.join(HERE, ".ci", "gpu"), "--smoke", "--data-dir",
                               str(tmp_path / "data"), str(out)], stdout=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "PYTHON": sys.executable})
    log, deadline = out / "log.txt", time.time() + 300
    while "--- Adam + movement" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.2)  # until the comparison's first row is done (after the two run first)
    os.killpg(script.pid, signal.SIGTERM)  # as `timeout` stops a command: its whole process group
    script.wait(timeout=60)
    while "STOPPED" not in log.read_text() and time.time() < deadline:  # the log's writer outlives the script
        time.sleep(0.2)
    lines = log.read_text().rstrip().splitlines()
    assert lines[-1].startswith("STOPPED by a signal in step: 3/4") and log.read_text().count("STOPPED") == 1
    with open(out / "comparison.json") as f:
        assert [row["name"] for row in json.load(f)["rows"]] == ["SGD + movement"]
    with tarfile.open(out / "runs.tar.gz") as runs:
        assert sorted(runs.getnames()) == ["resnet18-adamw-none-0/results.json",
                                           "resnet18-adamwprune-state-0.7/results.json",
                                           "resnet18-sgd-movement-0.7/results.json"]


def test_the_gpu_script_stops_at_its_first_error_and_names_the_step(tmp_path):
    done = run_gpu_script("--smoke", str(tmp_path / "out"), PYTHON="false")  # the first python call fails
    log = (tmp_path / "out" / "log.txt").read_text()
    assert done.returncode != 0 and "FAILED in step: the machine" in log and "=== 1/4" not in log
    assert run_gpu_script("--epochs", "0", str(tmp_path / "out")).returncode == 2
