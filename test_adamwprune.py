"""Tests: each one a behaviour, checked against an independent reference where there is one.

    $ python -m pytest -q
"""
import ast
import copy
import io
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import memory
from adamwprune import AdamWPrune, importance_score, kth_smallest

HERE = os.path.dirname(os.path.abspath(__file__))

# --- helpers ---


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
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype).contiguous(
            memory_format=torch.channels_last if p.dim() == 4 and not p.is_contiguous() else torch.contiguous_format)


def prunable(model):
    return [p for p in model.parameters() if p.dim() >= 2]


def zeros_fraction(params):
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


def cubic(t, s, start, end):
    """The schedule of DESIGN.md, written out again independently of adamwprune.py."""
    if t < start:
        return 0.0
    if t >= end:
        return s
    return s * (1 - (1 - (t - start) / (end - start)) ** 3)


# --- 1. with sparsity 0 it is AdamW ---


def test_equals_adamw_when_sparsity_is_zero():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), lr=3e-3, weight_decay=0.1, sparsity=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    for t in range(100):
        random_grads(ours.parameters(), t)
        random_grads(ref.parameters(), t)
        opt.step()
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    assert diff <= 1e-6


def test_equals_adamw_with_two_param_groups_of_different_lr_and_decay():
    ours, ref = small_net(), small_net()

    def groups(model):
        p = list(model.parameters())
        return [{"params": p[:2], "lr": 1e-2, "weight_decay": 0.0},
                {"params": p[2:], "lr": 1e-3, "weight_decay": 0.05}]
    opt = AdamWPrune(groups(ours), sparsity=0.0, betas=(0.8, 0.99), eps=1e-6)
    ref_opt = torch.optim.AdamW(groups(ref), betas=(0.8, 0.99), eps=1e-6)
    for t in range(100):
        random_grads(ours.parameters(), t)
        random_grads(ref.parameters(), t)
        opt.step()
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    assert diff <= 1e-6


def test_follows_an_lr_scheduler_like_adamw():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), lr=1e-2, sparsity=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30) for o in (opt, ref_opt)]
    for t in range(30):
        random_grads(ours.parameters(), t)
        random_grads(ref.parameters(), t)
        opt.step()
        ref_opt.step()
        for s in scheds:
            s.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    assert diff <= 1e-6


def test_parameters_without_gradient_on_some_steps_are_skipped_like_adamw():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), sparsity=0.0)
    ref_opt = torch.optim.AdamW(ref.parameters())
    for t in range(40):
        for model in (ours, ref):
            random_grads(model.parameters(), t)
            if t % 3 == 0:
                model[0].weight.grad = None  # e.g. a branch not taken on this step
        opt.step()
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    assert diff <= 1e-6


# --- 2. the schedule, exact counts, one global threshold ---


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


def test_ties_are_broken_to_the_exact_count():
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)  # every score equal
    opt = AdamWPrune(model.parameters(), lr=0.0, weight_decay=0.0, sparsity=0.37, importance="magnitude",
                     prune_start=1, prune_end=1)
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    assert int((model.weight == 0).sum()) == 37


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


# --- 3. pruned stays pruned ---


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


# --- 4. the importance scores ---


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


# --- 5. memory contract ---


def state_bytes(opt, params):
    return memory.optimizer_state_bytes(opt, params)


def test_no_extra_state_before_pruning_starts():
    ours, ref = small_net(), small_net()
    opt = AdamWPrune(ours.parameters(), sparsity=0.7, prune_start=50, prune_end=100)
    ref_opt = torch.optim.AdamW(ref.parameters())
    for t in range(10):
        random_grads(ours.parameters(), t)
        random_grads(ref.parameters(), t)
        opt.step()
        ref_opt.step()
    numel = sum(p.numel() for p in ours.parameters())
    assert state_bytes(opt, list(ours.parameters())) == 8 * numel
    assert state_bytes(opt, list(ours.parameters())) <= state_bytes(ref_opt, list(ref.parameters()))


def test_state_is_at_most_3_6_bytes_per_prunable_weight_at_70_percent():
    model = small_conv_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.7, prune_start=2, prune_end=20, prune_every=3)
    for t in range(25):
        random_grads(model.parameters(), t)
        opt.step()
    params = prunable(model)
    numel = sum(p.numel() for p in params)
    assert zeros_fraction(params) == round(0.7 * numel) / numel
    assert state_bytes(opt, params) / numel <= 3.6 + 12 / numel  # 12 B: one weight of rounding
    others = [p for p in model.parameters() if p.dim() < 2]
    assert state_bytes(opt, others) == 8 * sum(p.numel() for p in others)


def test_state_is_at_most_9_bytes_per_prunable_weight_while_sparsity_is_low():
    model = small_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.2, prune_start=2, prune_end=4, prune_every=1)
    for t in range(6):
        random_grads(model.parameters(), t)
        opt.step()
    params = prunable(model)
    numel = sum(p.numel() for p in params)
    assert state_bytes(opt, params) / numel <= 9.0


def test_threshold_search_holds_one_tensors_scores_at_a_time():
    # Eight tensors of 20,000 weights: a concatenation of all scores would be 640 kB.
    torch.manual_seed(0)
    tensors = [(torch.randn(20_000), torch.randn(20_000), torch.rand(20_000)) for _ in range(8)]
    score_fns = [lambda t=t: importance_score("variance", *t, 1e-8) for t in tensors]
    with memory.TensorMemoryTracker() as tracker:
        threshold = kth_smallest(score_fns, 70_000)
    largest_scores_bytes = 4 * 20_000
    concatenation_bytes = 8 * largest_scores_bytes
    # one tensor's float32 scores plus the bool mask of the comparison, a few bytes of counts
    assert tracker.peak_bytes <= largest_scores_bytes * 5 // 4 + 1024
    assert tracker.peak_bytes < concatenation_bytes / 4
    everything = torch.cat([fn() for fn in score_fns])
    assert int((everything <= threshold).sum()) == 70_000  # and the answer is right


# --- 6. state_dict round trip ---


def make_pruning_run():
    model = small_conv_net()
    opt = AdamWPrune(model.parameters(), lr=1e-2, sparsity=0.8, prune_start=4, prune_end=22, prune_every=3)
    return model, opt


@pytest.mark.parametrize("save_at", [3, 9, 17])  # before pruning; dense with pruned_index; compact
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


# --- 7. devices, dtypes, layouts, GradScaler ---


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    assert all(s["exp_avg"].dtype == dtype for s in opt.state.values())


def test_channels_last_conv_weights_prune_like_contiguous_ones():
    runs = []
    for channels_last in (False, True):
        model = small_conv_net()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        opt = AdamWPrune(model.parameters(), sparsity=0.7, prune_start=2, prune_end=10, prune_every=2)
        for t in range(15):
            random_grads(model.parameters(), t)
            opt.step()
        runs.append([p.detach().contiguous() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_step_skipped_by_grad_scaler_changes_nothing():
    model = small_net()
    opt = AdamWPrune(model.parameters(), sparsity=0.5, prune_start=1, prune_end=3, prune_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(8, 12)
    scaler.scale(model(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = copy.deepcopy(model.state_dict())
    step_before = opt.param_groups[0]["optimizer_step"]
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert opt.param_groups[0]["optimizer_step"] == step_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert scaler.get_scale() < 2.0 ** 8


# --- 8. bad input ---


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1e-3), "lr"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "betas[0]"), (dict(betas=(0.9, -0.1)), "betas[1]"),
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(prune_start=100, prune_end=10), "prune_end"), (dict(prune_every=0), "prune_every"),
    (dict(importance="random"), "importance"), (dict(schedule="exponential"), "schedule"),
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


# --- 9. copyable alone ---


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
