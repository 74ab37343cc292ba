# SPDX-License-Identifier: MIT
"""
AdamWPrune: AdamW that prunes weights during training, ranking them by its own Adam states.

Copy this file into your project: it needs nothing but torch.

Usage
    optimizer = AdamWPrune(model.parameters(), lr=1e-3, sparsity=0.7,
                           prune_start=200, prune_end=2000, prune_every=50)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    overall, per_tensor = optimizer.sparsity()   # fraction pruned, {parameter: fraction}

Algorithm, at optimizer step t of a param group (w weight, g gradient, m = exp_avg, v = exp_avg_sq)
    1. AdamW on every parameter that has a gradient. On a compacted tensor the decay scales the
       whole tensor (pruned weights are zero and stay zero); the rest of the update is computed
       for the kept weights alone, from their gathered gradients, and added at kept_index:
           w <- w * (1 - lr * weight_decay)
           m <- beta1 * m + (1 - beta1) * g
           v <- beta2 * v + (1 - beta2) * g * g
           w <- w - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    2. If t >= prune_start and t is on the prune_every grid (or t = prune_end), for the
       prunable tensors (2 or more dimensions, unless the group says `prune`):
       a. target count k = round(s(t) * N), N prunable weights, s(t) from the schedule:
              cubic:  s(t) = sparsity * (1 - (1 - (t - prune_start) / (prune_end - prune_start))^3)
              linear: s(t) = sparsity * (t - prune_start) / (prune_end - prune_start)
       b. score each weight from (w, m, v) alone, higher = more important:
              magnitude |w|                              (the default)
              variance  |w| * v^(1/4)
              hybrid    |w * m| * |w| / (sqrt(v) + eps)
              momentum  |w| * sqrt(|m|)
          Already-pruned weights score -1, so a mask never un-prunes.
       c. find the global threshold with exactly k scores at or below it (ties broken by
          position), by bisection over float32 values: one tensor's scores exist at a time,
          never a concatenation of all of them.
       d. set the pruned weights to zero. Once more than a quarter of a tensor is pruned,
          compact it: keep kept_index (int32) and m, v of the kept weights only.

Memory: optimizer state per prunable element (fp32 parameters)
    phase                          AdamW   AdamWPrune
    before prune_start             8 B     8 B (m, v): nothing extra
    sparsity s <= 0.25             8 B     8 B + 4s B of pruned_index (int32): at most 9 B
    sparsity s > 0.25 (compact)    8 B     12 (1 - s) B: kept_index, m, v of kept weights
    at s = 0.7                     8 B     3.6 B
    choosing a threshold           -       transient: one tensor's scores (4 B) and their
                                           comparison mask (1 B) per element, at a time

Caveats
    - One threshold per param group: put all prunable tensors in one group (the default) for
      a global ranking; a group with its own `sparsity` is pruned to that fraction by itself.
    - Pruning acts on the parameter values the optimizer sees: load pretrained weights before
      the first mask update, and do not write into pruned weights afterwards.
    - Frozen parameters (requires_grad=False) are never pruned.
    - Masks index a tensor's memory: keep a parameter's layout (e.g. channels_last) fixed once
      pruning has begun.
    - For bf16/fp16 parameters, a compacted tensor adds its AdamW change rounded to the
      parameter's dtype: kept weights may differ from dense AdamW by one unit in the last place.
    - Sparse gradients are not supported.

References: AdamW, Loshchilov & Hutter 2019 (arXiv:1711.05101); the cubic schedule,
Zhu & Gupta 2017 (arXiv:1710.01878).
"""
import math
import warnings

import torch

IMPORTANCES = ("hybrid", "variance", "momentum", "magnitude")
SCHEDULES = ("cubic", "linear")


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                 weight_decay):
    """One AdamW step, in place, on lists of tensors (the arithmetic of torch.optim.AdamW)."""
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in steps])


def scheduled_sparsity(step, sparsity, schedule, prune_start, prune_end):
    """Fraction of prunable weights to have pruned after `step` optimizer steps."""
    if step < prune_start:
        return 0.0
    if step >= prune_end:
        return sparsity
    progress = (step - prune_start) / (prune_end - prune_start)
    if schedule == "cubic":
        return sparsity * (1 - (1 - progress) ** 3)
    return sparsity * progress


def importance_score(importance, weight, exp_avg, exp_avg_sq, eps):
    """Importance of each weight (higher = keep), as a new float32 tensor.

    Each chain allocates one tensor and then works in place: that tensor is the whole
    transient memory of a score."""
    f32 = dict(dtype=torch.float32, copy=True)
    if importance == "hybrid":  # |w * m| * |w| / (sqrt(v) + eps)
        score = exp_avg_sq.to(**f32).sqrt_().add_(eps).reciprocal_()
        return score.mul_(exp_avg).mul_(weight).mul_(weight).abs_()
    if importance == "variance":  # |w| * v^(1/4)
        return exp_avg_sq.to(**f32).pow_(0.25).mul_(weight).abs_()
    if importance == "momentum":  # |w| * sqrt(|m|)
        return exp_avg.to(**f32).abs_().sqrt_().mul_(weight).abs_()
    return weight.to(**f32).abs_()  # magnitude: |w|


def flat_view(tensor):
    """A 1-D view of a dense tensor's elements in memory order (contiguous or channels_last)."""
    dims_outer_first = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    return tensor.permute(dims_outer_first).view(-1)


def _float_from_bits(bits):
    """The float32 whose bit pattern is the integer `bits`."""
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def kth_smallest(score_fns, k):
    """A float32 value t with exactly k scores <= t over all tensors or, where ties make that
    impossible, the smallest t with more.

    Bisection over the bit patterns of non-negative float32 values (their integer order is
    their numeric order): at most 31 passes, each computing one tensor's scores at a time.
    Negative scores (pruned weights) always count."""
    low, high = 0, 0x7F800000  # the bit patterns of 0.0 and +inf
    while low < high:
        middle = (low + high) // 2
        value = _float_from_bits(middle)
        counts = [(fn() <= value).sum() for fn in score_fns]  # queued on the device, then read
        count = sum(int(c) for c in counts)
        if count == k:
            return value
        if count > k:
            high = middle
        else:
            low = middle + 1
    return _float_from_bits(low)


def _check_options(o):
    for name in ("lr", "eps", "weight_decay"):
        if not o[name] >= 0.0:
            raise ValueError(f"Invalid {name}: {o[name]} (must be >= 0)")
    if len(o["betas"]) != 2:
        raise ValueError(f"Invalid betas: {o['betas']} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(o["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta} (must be in [0, 1))")
    if not 0.0 <= o["sparsity"] < 1.0:
        raise ValueError(f"Invalid sparsity: {o['sparsity']} (must be in [0, 1))")
    if o["importance"] == "hybrid" and not o["eps"] > 0:
        raise ValueError(f"Invalid eps: {o['eps']} (must be > 0 for importance='hybrid', which divides by it)")
    if o["importance"] not in IMPORTANCES:
        raise ValueError(f"Invalid importance: {o['importance']!r} (choose from {', '.join(IMPORTANCES)})")
    if o["schedule"] not in SCHEDULES:
        raise ValueError(f"Invalid schedule: {o['schedule']!r} (choose from {', '.join(SCHEDULES)})")
    if not o["prune_start"] >= 0:
        raise ValueError(f"Invalid prune_start: {o['prune_start']} (must be >= 0)")
    if not o["prune_end"] >= o["prune_start"]:
        raise ValueError(f"Invalid prune_end: {o['prune_end']} (must be >= prune_start = {o['prune_start']})")
    if not o["prune_every"] >= 1:
        raise ValueError(f"Invalid prune_every: {o['prune_every']} (must be >= 1)")
    if o["prune"] not in (None, True, False):
        raise ValueError(f"Invalid prune: {o['prune']!r} (must be True, False or None for 2+ dims)")


class AdamWPrune(torch.optim.Optimizer):
    """AdamW that prunes during training by its own states; the module docstring has the algorithm.

    Args:
        params: parameters or param groups; a group may override any option below and set
            `prune` (True/False) to choose its tensors (default: tensors of 2+ dimensions)
        lr: learning rate (default: 1e-3)
        betas: coefficients of the running averages of g and g^2 (default: (0.9, 0.999))
        eps: added to the denominator for numerical stability (default: 1e-8)
        weight_decay: decoupled weight decay (default: 1e-2)
        sparsity: final fraction of prunable weights set to zero, in [0, 1) (default: 0.7)
        importance: magnitude, variance, hybrid or momentum (default: "magnitude", the best of
            the four on average in this project's ablation; see README.md)
        schedule: cubic or linear growth of sparsity (default: "cubic")
        prune_start: optimizer step where pruning starts (default: 200)
        prune_end: optimizer step where the final sparsity is reached (default: 2000)
        prune_every: optimizer steps between mask updates (default: 50)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 sparsity=0.7, importance="magnitude", schedule="cubic", prune_start=200,
                 prune_end=2000, prune_every=50):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sparsity=sparsity,
                        importance=importance, schedule=schedule, prune_start=prune_start,
                        prune_end=prune_end, prune_every=prune_every, prune=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        _check_options({**self.defaults, **param_group})
        param_group.setdefault("optimizer_step", 0)  # the pruning schedule's clock
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["optimizer_step"] += 1
            self._adamw_step(group)
            t = group["optimizer_step"]
            if group["sparsity"] > 0 and t >= group["prune_start"] and (
                    (t - group["prune_start"]) % group["prune_every"] == 0 or t == group["prune_end"]):
                self._update_masks(group)
        return loss

    def sparsity(self):
        """Fraction of prunable weights pruned: (overall, {parameter: fraction})."""
        per_tensor = {p: self._pruned_count(p) / p.numel()
                      for group in self.param_groups for p in group["params"] if self._prunable(p, group)}
        numel = sum(p.numel() for p in per_tensor)
        overall = sum(self._pruned_count(p) for p in per_tensor) / numel if numel else 0.0
        return overall, per_tensor

    def load_state_dict(self, state_dict):
        # torch's loader casts every state tensor to its parameter's dtype (see
        # Optimizer._process_value_according_to_param_policy): index tensors must stay int32.
        indices = {pid: {k: v for k, v in s.items() if k in ("kept_index", "pruned_index")}
                   for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            for key, index in indices.get(pid, {}).items():
                self.state[p][key] = index.to(p.device)

    # --- the AdamW step ---

    def _adamw_step(self, group):
        dense = ([], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, steps
        compact = ([], [], [], [], [])  # the same for kept weights, with changes in place of params
        compact_params, masked_params = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWPrune does not support sparse gradients; use dense "
                                   "gradients (e.g. nn.Embedding(sparse=False))")
            state = self.state[p]
            if not state:
                self._init_state(p)
            state["step"] += 1
            grad = p.grad
            if "kept_index" in state:
                if grad.stride() != p.stride():  # flat views must index both the same way
                    grad = torch.empty_like(p).copy_(grad)
                grad_kept = flat_view(grad).index_select(0, state["kept_index"])
                compact_params.append(p)
                items, target = (torch.zeros_like(grad_kept), grad_kept), compact
            else:
                items, target = (p, grad), dense
                if "pruned_index" in state:
                    masked_params.append(p)
            for lst, item in zip(target, (*items, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                lst.append(item)
        beta1, beta2 = group["betas"]
        options = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"])
        adamw_update(*dense, **options)
        # Compact tensors: decay every weight (pruned ones are zero and stay zero), compute the
        # AdamW change of the kept weights starting from zero, and add it at kept_index.
        if compact_params and group["weight_decay"] != 0:
            torch._foreach_mul_(compact_params, 1 - group["lr"] * group["weight_decay"])
        adamw_update(*compact, **{**options, "weight_decay": 0})
        for p, change in zip(compact_params, compact[0]):
            flat_view(p).index_add_(0, self.state[p]["kept_index"], change)
        for p in masked_params:  # index_fill_ takes int64 indices: a transient copy
            flat_view(p).index_fill_(0, self.state[p]["pruned_index"].long(), 0)

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = 0
        # running average of the gradient, m (first moment)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # running average of the squared gradient, v (second moment)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # --- pruning ---

    def _prunable(self, p, group):
        if not p.requires_grad:  # frozen: not trained, so not ranked against trained weights
            return False
        return group["prune"] if group["prune"] is not None else p.dim() >= 2

    def _scored_count(self, p):
        return p.numel() - self._pruned_count(p) if "kept_index" in self.state[p] else p.numel()

    def _pruned_count(self, p):
        state = self.state.get(p, {})
        if "kept_index" in state:
            return p.numel() - state["kept_index"].numel()
        return state["pruned_index"].numel() if "pruned_index" in state else 0

    def _score(self, p, group):
        """Importance of p's prunable positions (float32, flat): all of them, or the kept ones."""
        state = self.state[p]
        weight, exp_avg, exp_avg_sq = flat_view(p), state["exp_avg"], state["exp_avg_sq"]
        if "kept_index" in state:
            weight = weight.index_select(0, state["kept_index"])
        else:
            exp_avg, exp_avg_sq = flat_view(exp_avg), flat_view(exp_avg_sq)
        score = importance_score(group["importance"], weight, exp_avg, exp_avg_sq, group["eps"])
        if "pruned_index" in state:
            score[state["pruned_index"]] = -1.0
        return score

    def _update_masks(self, group):
        params = [p for p in group["params"] if self._prunable(p, group)]
        for p in params:
            if not self.state[p]:
                self._init_state(p)  # a weight that never had a gradient scores as unimportant
        numel = sum(p.numel() for p in params)
        target = scheduled_sparsity(group["optimizer_step"], group["sparsity"], group["schedule"],
                                    group["prune_start"], group["prune_end"])
        k = round(target * numel)
        if k <= sum(self._pruned_count(p) for p in params):
            return
        score_fns = [lambda p=p: self._score(p, group) for p in params]
        # scores are >= 0, or -1 where pruned: a max is nan or inf exactly when some score is
        scored = [fn for p, fn in zip(params, score_fns) if self._scored_count(p) > 0]
        if not all(bool(fn().max().isfinite()) for fn in scored):
            warnings.warn(f"AdamWPrune: non-finite importance scores at step {group['optimizer_step']}; "
                          "mask update skipped (check for inf/nan weights or gradients)")
            return
        # compacted tensors score only their kept weights: their pruned ones are already counted
        k -= sum(self._pruned_count(p) for p in params if "kept_index" in self.state[p])
        threshold = kth_smallest(score_fns, k)
        ties_left = k - sum(int((fn() < threshold).sum()) for fn in score_fns)
        for p, fn in zip(params, score_fns):
            score = fn()
            prune = score < threshold
            if ties_left > 0:
                ties = (score == threshold).nonzero().flatten()[:ties_left]
                prune[ties] = True
                ties_left -= ties.numel()
            del score  # before _apply_prune allocates: one tensor's transients at a time
            self._apply_prune(p, prune)

    def _apply_prune(self, p, prune):
        """Zero the weights where `prune` (over p's scored positions) and shrink p's state."""
        state, flat = self.state[p], flat_view(p)
        if "kept_index" in state:  # already compact: `prune` indexes the kept weights
            flat[state["kept_index"][prune]] = 0
            keep = ~prune
            for key in ("kept_index", "exp_avg", "exp_avg_sq"):
                state[key] = state[key][keep]
            return
        flat.masked_fill_(prune, 0)
        pruned_count = int(prune.sum())
        # compact when it is cheaper: 12 B per kept weight < 8 B per weight + 4 B per pruned one
        if 12 * (p.numel() - pruned_count) < 8 * p.numel() + 4 * pruned_count:
            kept_index = (~prune).nonzero().flatten().to(torch.int32)
            state.pop("pruned_index", None)
            state["kept_index"] = kept_index
            state["exp_avg"] = flat_view(state["exp_avg"])[kept_index]
            state["exp_avg_sq"] = flat_view(state["exp_avg_sq"])[kept_index]
        else:
            state["pruned_index"] = prune.nonzero().flatten().to(torch.int32)
