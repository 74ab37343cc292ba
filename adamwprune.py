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

    It takes torch.optim.AdamW's arguments (amsgrad, maximize, foreach, fused) and loads its
    state_dict. Parameters sharded by FSDP2's fully_shard need nothing more (see Caveats).

Algorithm. Each parameter p counts its own steps n_p (AdamW's bias correction); each param group
counts optimizer steps c (the pruning clock). w weight, g gradient, m = exp_avg, v = exp_avg_sq.
    1. AdamW on every parameter that has a gradient, with n_p <- n_p + 1:
           w <- w * (1 - lr * weight_decay)
           m <- beta1 * m + (1 - beta1) * g
           v <- beta2 * v + (1 - beta2) * g * g          (amsgrad: v_max <- max(v_max, v))
           w <- w - lr * (m / (1 - beta1^n_p)) / (sqrt(v / (1 - beta2^n_p)) + eps)
       The arithmetic is torch's own: the class gathers lists and calls the functional
       torch.optim.adamw.adamw, whose fused kernel runs where the device supports it. A pruned
       weight of a dense tensor has w = 0 and v = +inf, so its step is exactly zero (m / inf)
       and decay keeps it at zero. A compacted tensor is decayed whole (pruned weights stay
       zero); the rest of the step runs on its kept weights alone, from their gathered
       gradients, and is added back at kept_index.
    2. If c >= prune_start and c is on the prune_every grid (or c = prune_end), for the
       prunable tensors (2 or more dimensions, unless the group says `prune`):
       a. target count k = min(round(s(c) * N), N - 1), N prunable weights (one always stays):
              cubic:  s(c) = sparsity * (1 - (1 - (c - prune_start) / (prune_end - prune_start))^3)
              linear: s(c) = sparsity * (c - prune_start) / (prune_end - prune_start)
       b. score each weight from (w, m, v) alone, higher = more important:
              magnitude |w|                              (the default)
              variance  |w| * v^(1/4)
              hybrid    |w * m| * |w| / (sqrt(v) + eps)
              momentum  |w| * sqrt(|m|)
          Already-pruned weights score -inf, so a mask never un-prunes. A prunable weight that
          never had a gradient has m = v = 0: the state scores rank it lowest, magnitude by |w|.
       c. find the k lowest scores of all tensors (ties broken by position) by a radix select
          on the float32 bit patterns: pass 1 counts the high 16 bits, pass 2 the low 16 bits
          inside the chosen bucket, pass 3 marks. One tensor's scores exist at a time.
       d. prune: w <- 0, v <- +inf. Once compact state is smaller for the tensor's dtype (for
          fp32: more than a third pruned, a quarter with amsgrad), keep kept_index (int32) and
          m, v of the kept weights only.

Memory: optimizer state per prunable element (fp32 parameters; amsgrad adds v_max like v)
    phase                          AdamW   AdamWPrune
    before prune_start             8 B     8 B (m, v): nothing extra
    sparsity s <= 1/3              8 B     8 B: the mask is v = +inf, no extra buffer
    sparsity s > 1/3 (compact)     8 B     12 (1 - s) B: kept_index, m, v of kept weights
    at s = 0.7                     8 B     3.6 B (amsgrad: 4.8 B, AdamW's 12 B)
    transient, a mask update       -       one tensor's scores (4 B per element, turned into
                                           histogram bins in place), plus 5 B per element of
                                           it (gathered weights, a bool mask) at most
    transient, a step              -       gathered gradients and the kept weights' change:
                                           2 x 4 B per kept weight of compacted tensors

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
    - FSDP2 (fully_shard, Shard(0) on a 1-D mesh): each rank steps and scores its local shard and
      keeps compact state for it alone; each threshold pass sums its counts over the mesh's
      process group, so the k pruned are those one process would prune. Every rank must call
      step() (as FSDP2 requires anyway). sparsity() reports this rank's shards.
    - DDP: every rank computes the same mask; pass check_replicas=<process group> to verify that
      after every mask update (two small all-reduces).
    - Sparse gradients, capturable (CUDA graphs) and differentiable are not supported.

References: AdamW, Loshchilov & Hutter 2019 (arXiv:1711.05101); the cubic schedule,
Zhu & Gupta 2017 (arXiv:1710.01878).
"""
import math
import warnings

import torch
from torch.optim.adamw import adamw

IMPORTANCES = ("hybrid", "variance", "momentum", "magnitude")
SCHEDULES = ("cubic", "linear")


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


def target_count(sparsity, numel):
    """How many of `numel` weights a fraction `sparsity` prunes: rounded, and never all of them."""
    return max(0, min(round(sparsity * numel), numel - 1))


def importance_score(importance, weight, exp_avg, exp_avg_sq, eps, out=None):
    """Importance of each weight (higher = keep), as a float32 tensor: `out`, or a new one.

    Each chain copies one operand into that tensor and then works in place: it is the whole
    transient memory of a score."""
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if out is None else out
    if importance == "hybrid":  # |w * m| * |w| / (sqrt(v) + eps)
        score = out.copy_(exp_avg_sq).sqrt_().add_(eps).reciprocal_()
        return score.mul_(exp_avg).mul_(weight).mul_(weight).abs_()
    if importance == "variance":  # |w| * v^(1/4)
        return out.copy_(exp_avg_sq).pow_(0.25).mul_(weight).abs_()
    if importance == "momentum":  # |w| * sqrt(|m|)
        return out.copy_(exp_avg).abs_().sqrt_().mul_(weight).abs_()
    return out.copy_(weight).abs_()  # magnitude: |w|


def flat_view(tensor):
    """A 1-D view of a dense tensor's elements in memory order (contiguous or channels_last)."""
    dims_outer_first = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    return tensor.permute(dims_outer_first).view(-1)


def local(tensor):
    """This rank's part of a sharded (DTensor) parameter or gradient; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# --- the k lowest scores: a radix select over float32 bit patterns ---
BINS = 1 << 16  # one bin per value of 16 bits


def _float_order(histogram):
    """Bins indexed by (bits >> 16) + 2^15 reordered by float value: a negative float's bits
    grow as it falls, so the lower half runs backwards."""
    return torch.cat([histogram[:BINS // 2].flip(0), histogram[BINS // 2:]])


def lowest_k(score_fns, k, device, unscored=0, group=None):
    """The k lowest scores of all tensors: (threshold, [(i, prune), ...]), the list made one
    tensor at a time as it is read, prune a bool tensor over the scores of score_fns[i]().
    Scores below the threshold are marked, and as many equal to it as make k, by position
    (tensor by tensor; within a tensor rank by rank, then in memory order).

    score_fns[i]() returns a 1-D float32 tensor on `device`, -inf where a weight is already
    pruned, which this overwrites (it may reuse one buffer: each is read before the next call). `unscored` counts pruned weights that
    have no score: they rank lowest. With a process group, every rank holds shards of the same
    tensors, and the counts of each pass are summed over the group in the same collectives on
    every rank. None when the k lowest are all pruned already, or when a score is NaN or +inf
    (then with a warning, on every rank)."""

    def summed_over_ranks(counts):  # the one place where ranks talk
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        return counts.cpu()

    def scores(fn):  # -0.0 becomes 0.0, so that equal scores have equal bits
        return fn().add_(0.0)

    # 1) a histogram of the high 16 bits, after the unscored; and how many tensors hold NaN or +inf
    counts = torch.zeros(BINS + 2, dtype=torch.int64, device=device)
    counts[0] = unscored
    for fn in score_fns:
        bits = scores(fn).view(torch.int32)
        if bits.numel():
            counts[BINS + 1] += (~(bits.view(torch.float32).max() < math.inf)).to(torch.int64)
        bits.bitwise_right_shift_(16).add_(BINS // 2)  # each score's bin, in [0, 2^16)
        counts[1:BINS + 1] += torch.bincount(bits, minlength=BINS)
    counts = summed_over_ranks(counts)
    if counts[BINS + 1]:
        warnings.warn("AdamWPrune: non-finite importance scores; mask update skipped "
                      "(check for inf/nan weights or gradients)")
        return None
    at_or_below = torch.cat([counts[:1], _float_order(counts[1:BINS + 1])]).cumsum(0)
    position = int(torch.searchsorted(at_or_below, k))  # 0: the unscored, else 1 + a bin by value
    if position == 0:
        return None
    high = -position if position <= BINS // 2 else position - 1 - BINS // 2  # its high bits, signed
    count_below = int(at_or_below[position - 1])
    # 2) a histogram of the low 16 bits inside that bin
    counts = torch.zeros(BINS + 2, dtype=torch.int64, device=device)
    for fn in score_fns:
        bits = scores(fn).view(torch.int32).sub_(high << 16).clamp_(-1, BINS).add_(1)  # 1 + low bits
        counts += torch.bincount(bits, minlength=BINS + 2)
    inside = summed_over_ranks(counts)[1:BINS + 1]
    inside = inside.flip(0) if high < 0 else inside  # by value
    at_or_below = inside.cumsum(0) + count_below
    position = int(torch.searchsorted(at_or_below, k))
    low = position if high >= 0 else BINS - 1 - position
    threshold = torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32).item()
    if threshold == -math.inf:
        return None
    equal = int(inside[position])
    ties = k - (int(at_or_below[position]) - equal)  # how many of the scores equal to it go
    # 3) mark: every score below the threshold, and the first `ties` of those equal to it
    ties_before = None  # per tensor, on a shard: the ties in earlier tensors and on earlier ranks
    if ties < equal and group is not None:
        mine = torch.tensor([int((scores(fn) == threshold).sum()) for fn in score_fns], device=device)
        every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(every, mine, group=group)
        every = torch.stack(every).cpu()  # (ranks, tensors)
        per_tensor = every.sum(0)
        rank = torch.distributed.get_rank(group)
        ties_before = (per_tensor.cumsum(0) - per_tensor + every[:rank].sum(0)).tolist()

    def marks():
        taken = 0
        for i, fn in enumerate(score_fns):
            score = scores(fn)
            if ties == equal:
                prune = score <= threshold
            else:
                prune = score < threshold
                before = taken if ties_before is None else ties_before[i]
                tied = (score == threshold).nonzero().flatten()[:max(0, ties - before)]
                prune[tied] = True
                taken += tied.numel()
            del score
            yield i, prune
    return threshold, marks()


# --- the optimizer ---
def _check_options(o):
    for name in ("lr", "eps", "weight_decay"):
        if not o[name] >= 0.0:
            raise ValueError(f"Invalid {name}: {o[name]} (must be >= 0)")
    if len(o["betas"]) != 2:
        raise ValueError(f"Invalid betas: {o['betas']} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(o["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta} (must be in [0, 1))")
    for name in ("capturable", "differentiable"):
        if o[name]:
            raise ValueError(f"Invalid {name}: True (must be False: AdamWPrune changes the size of its "
                             "state at mask updates, which CUDA graphs and autograd through the step cannot follow)")
    if o["fused"] and o["foreach"]:
        raise ValueError("Invalid fused: True together with foreach=True (must choose one)")
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


def _pick_kernel(group):
    """fused=None: torch's fused kernel where it runs (CPU, CUDA), unless foreach was asked for."""
    if group["fused"] is None and not group["foreach"]:
        group["fused"] = all(local(p).device.type in ("cpu", "cuda") for p in group["params"])


class AdamWPrune(torch.optim.Optimizer):
    """AdamW that prunes during training by its own states; the module docstring has the algorithm.

    Args:
        params: parameters or param groups; a group may override any option below and set
            `prune` (True/False) to choose its tensors (default: tensors of 2+ dimensions)
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as torch.optim.AdamW
            (defaults: 1e-3, (0.9, 0.999), 1e-8, 1e-2, False, False, None)
        fused: torch's fused AdamW kernel; None picks it where every parameter is on the CPU or
            CUDA and foreach is not set (default: None)
        capturable, differentiable: accepted for AdamW's signature; must be False
        sparsity: final fraction of prunable weights set to zero, in [0, 1) (default: 0.7)
        importance: magnitude, variance, hybrid or momentum (default: "magnitude"; see README.md)
        schedule: cubic or linear growth of sparsity (default: "cubic")
        prune_start: optimizer step where pruning starts (default: 200)
        prune_end: optimizer step where the final sparsity is reached (default: 2000)
        prune_every: optimizer steps between mask updates (default: 50)
        check_replicas: a process group whose ranks hold the same parameters (DDP); after each
            mask update they compare pruned counts and thresholds, and raise if any differ
            (default: None, no check)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, sparsity=0.7, importance="magnitude",
                 schedule="cubic", prune_start=200, prune_end=2000, prune_every=50,
                 check_replicas=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, sparsity=sparsity,
                        importance=importance, schedule=schedule, prune_start=prune_start,
                        prune_end=prune_end, prune_every=prune_every, prune=None)
        self.check_replicas = check_replicas
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        _check_options({**self.defaults, **param_group})
        param_group.setdefault("optimizer_step", 0)  # the pruning schedule's clock, c
        super().add_param_group(param_group)
        _pick_kernel(self.param_groups[-1])

    def __setstate__(self, state):
        # Loading a state_dict comes here: fill in group keys it lacks (torch.optim.AdamW's, or
        # an older AdamWPrune's) with the defaults, the clock with the steps taken so far.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            steps = [int(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
            group.setdefault("optimizer_step", max(steps, default=0))
            _check_options(group)
            _pick_kernel(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["optimizer_step"] += 1
            self._adamw_step(group)
            c = group["optimizer_step"]
            if group["sparsity"] > 0 and group["prune_start"] <= c <= group["prune_end"] and (
                    (c - group["prune_start"]) % group["prune_every"] == 0 or c == group["prune_end"]):
                self._update_masks(group)
        return loss

    def sparsity(self):
        """Fraction of prunable weights pruned: (overall, {parameter: fraction}); on this rank's shards."""
        counts = {p: (self._pruned_count(p), local(p).numel())
                  for group in self.param_groups for p in group["params"] if self._prunable(p, group)}
        numel = sum(n for _, n in counts.values())
        overall = sum(pruned for pruned, _ in counts.values()) / numel if numel else 0.0
        return overall, {p: pruned / n if n else 0.0 for p, (pruned, n) in counts.items()}

    def kept_mask(self, p):
        """A bool tensor shaped like p (this rank's shard of it): True where the weight is kept."""
        state, param = self.state.get(p, {}), local(p)
        if "kept_index" in state:
            mask = torch.zeros_like(param, dtype=torch.bool)
            flat_view(mask)[state["kept_index"]] = True
            return mask
        if "exp_avg_sq" in state:
            return state["exp_avg_sq"] != math.inf
        return torch.ones_like(param, dtype=torch.bool)

    def load_state_dict(self, state_dict):
        # torch's loader casts every state tensor of a float parameter to its dtype (see
        # Optimizer._process_value_according_to_param_policy): indices must stay int32.
        indices = {pid: s["kept_index"] for pid, s in state_dict["state"].items() if "kept_index" in s}
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for pid, (p, group) in zip(saved_ids, params):
            state = self.state.get(p)
            if not state:
                continue
            if pid in indices:
                state["kept_index"] = indices[pid].to(p.device)
            # steps: tensors, on the parameter's device for the fused kernel (AdamW keeps them
            # on the CPU otherwise; an older AdamWPrune kept an int)
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(
                p.device if group["fused"] else "cpu")
            if "pruned_index" in state:  # an older AdamWPrune's dense mask: the v = +inf mask now
                pruned = state.pop("pruned_index").to(p.device).long()
                flat_view(state["exp_avg_sq"]).index_fill_(0, pruned, math.inf)
            saved_on, loaded_on = tuple(state.get("shard", ())), _shard_of(p)
            if saved_on != loaded_on:
                where = lambda shard: f"rank {shard[0]} of {shard[1]}" if shard else "an unsharded parameter"
                raise RuntimeError(
                    f"AdamWPrune: optimizer state saved on {where(saved_on)} is loaded on {where(loaded_on)}: "
                    "under FSDP2 each rank saves and loads its own optimizer.state_dict() (torch.save, one "
                    "file per rank), at the same world size. torch.distributed.checkpoint keeps only one "
                    "rank's copy of AdamWPrune's per-rank state, so it cannot be used")

    # --- the AdamW step ---

    def _adamw_step(self, group):
        dense = ([], [], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
        compact = ([], [], [], [], [], [])  # the same for kept weights, with changes in place of params
        compacted = []  # (param, grad, kept_index)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWPrune does not support sparse gradients; use dense "
                                   "gradients (e.g. nn.Embedding(sparse=False))")
            state = self.state[p]
            if not state:
                self._init_state(p, group)
            lists = compact if "kept_index" in state else dense
            if "kept_index" in state:
                compacted.append((local(p), local(p.grad), state["kept_index"]))
            else:
                lists[0].append(local(p))
                lists[1].append(local(p.grad))
            lists[2].append(state["exp_avg"])
            lists[3].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                lists[4].append(state["max_exp_avg_sq"])
            lists[5].append(state["step"])
        beta1, beta2 = group["betas"]
        options = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"], eps=group["eps"],
                       maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"])
        if dense[0]:
            adamw(*dense, weight_decay=group["weight_decay"], **options)
        if not compacted:
            return
        # Compacted tensors: the kept gradients are gathered, and the AdamW change of the kept
        # weights is computed from zero, in one block per device and dtype (one allocation a
        # step: on the CPU, fresh pages for many large ones cost more than the gathers). Decay
        # scales the whole tensor (pruned weights are zero and stay zero); the change is added
        # at kept_index.
        sizes = {}
        for param, _, kept_index in compacted:
            sizes.setdefault((param.device, param.dtype), []).append(kept_index.numel())
        blocks = {}
        for (device, dtype), numels in sizes.items():
            block = torch.empty(2, sum(numels), dtype=dtype, device=device)
            block[0].zero_()
            blocks[device, dtype] = iter(block.split(numels, dim=1))  # (change, gradient) pairs
        for param, grad, kept_index in compacted:
            change, kept_grad = next(blocks[param.device, param.dtype])
            if grad.stride() != param.stride():  # flat views must index both the same way
                grad = torch.empty_like(param).copy_(grad)
            torch.index_select(flat_view(grad), 0, kept_index, out=kept_grad)
            compact[0].append(change)
            compact[1].append(kept_grad)
            param.mul_(1 - group["lr"] * group["weight_decay"])
        adamw(*compact, weight_decay=0.0, **options)
        for (param, _, kept_index), change in zip(compacted, compact[0]):
            flat_view(param).index_add_(0, kept_index, change)

    def _init_state(self, p, group):
        param, state = local(p), self.state[p]
        # AdamW's step count n_p, a tensor where torch's kernels want it
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if group["fused"] else "cpu")
        # running average of the gradient, m (first moment)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        # running average of the squared gradient, v (second moment); +inf marks a pruned weight
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:  # the largest v so far, v_max
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if hasattr(p, "device_mesh"):  # a shard's state is this rank's alone: (rank, ranks)
            state["shard"] = _shard_of(p)

    # --- pruning ---

    def _prunable(self, p, group):
        if not p.requires_grad:  # frozen: not trained, so not ranked against trained weights
            return False
        return group["prune"] if group["prune"] is not None else p.dim() >= 2

    def _pruned_count(self, p):
        state = self.state.get(p, {})
        if "kept_index" in state:
            return local(p).numel() - state["kept_index"].numel()
        return int((state["exp_avg_sq"] == math.inf).count_nonzero()) if "exp_avg_sq" in state else 0

    def _score(self, p, group, scratch, has_pruned):
        """Importance of p's scored positions (float32, flat): all of them, or the kept ones;
        written into `scratch`, a buffer as large as the group's largest tensor."""
        state = self.state[p]
        weight, exp_avg, exp_avg_sq = flat_view(local(p)), state["exp_avg"], state["exp_avg_sq"]
        if "kept_index" in state:
            weight = weight.index_select(0, state["kept_index"])
        else:
            exp_avg, exp_avg_sq = flat_view(exp_avg), flat_view(exp_avg_sq)
        score = importance_score(group["importance"], weight, exp_avg, exp_avg_sq, group["eps"],
                                 out=scratch[:weight.numel()])
        if has_pruned and "kept_index" not in state:  # a dense tensor's pruned weights: v = +inf
            score.masked_fill_(exp_avg_sq == math.inf, -math.inf)
        return score

    def _update_masks(self, group):
        params = [p for p in group["params"] if self._prunable(p, group)]
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self._init_state(p, group)
        process_group = _process_group(params)
        target = scheduled_sparsity(group["optimizer_step"], group["sparsity"], group["schedule"],
                                    group["prune_start"], group["prune_end"])
        k = target_count(target, sum(p.numel() for p in params))  # p.numel(): the whole tensor
        unscored = sum(self._pruned_count(p) for p in params if "kept_index" in self.state[p])
        device = local(params[0]).device
        scratch = torch.empty(max(local(p).numel() for p in params), dtype=torch.float32, device=device)
        has_pruned = {p: "kept_index" not in self.state[p] and self._pruned_count(p) > 0 for p in params}
        score_fns = [lambda p=p: self._score(p, group, scratch, has_pruned[p]) for p in params]
        found = lowest_k(score_fns, k, device, unscored, process_group)
        threshold = math.nan if found is None else found[0]
        for i, prune in found[1] if found else []:
            self._apply_prune(params[i], group, prune)
        if self.check_replicas is not None:
            _check_replicas(self.check_replicas, threshold, group["optimizer_step"])

    def _apply_prune(self, p, group, prune):
        """Zero the weights where `prune` (over p's scored positions) and shrink p's state."""
        state, flat = self.state[p], flat_view(local(p))
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        compact = "kept_index" in state
        if not compact:
            # compact when it is smaller: an int32 index and the moments per kept weight, against
            # the moments per weight
            kept = flat.numel() - int(prune.count_nonzero())
            moment_bytes = len(moments) * flat.element_size()
            if kept * (4 + moment_bytes) >= flat.numel() * moment_bytes:
                flat.masked_fill_(prune, 0)
                for key in moments[1:]:  # v = +inf: the step of a pruned weight is zero from now on
                    flat_view(state[key]).masked_fill_(prune, math.inf)
                return
            for key in moments:
                state[key] = flat_view(state[key])
        kept_at = (~prune).nonzero().flatten()  # among the scored positions
        kept_index = state["kept_index"].index_select(0, kept_at) if compact else kept_at.to(torch.int32)
        for key in moments:
            state[key] = state[key].index_select(0, kept_at)
        state["kept_index"] = kept_index
        kept_weights = flat.index_select(0, kept_index)
        flat.zero_().index_add_(0, kept_index, kept_weights)  # (faster than a masked fill)


# --- several processes: FSDP2 shards, DDP replicas ---
def _process_group(params):
    """The process group over which these parameters are sharded (FSDP2), or None."""
    sharded = [p for p in params if hasattr(p, "device_mesh")]
    if not sharded:
        return None
    meshes = {p.device_mesh for p in sharded}
    if len(meshes) > 1 or len(sharded) != len(params):
        raise RuntimeError("AdamWPrune: the prunable tensors of a param group must all be sharded over "
                           "one device mesh, or none of them: give the others a param group of their own")
    mesh = meshes.pop()
    if mesh.ndim != 1 or not all(placement.is_shard(0) for p in sharded for placement in p.placements):
        raise RuntimeError("AdamWPrune: sharded parameters must be Shard(0) on a 1-D mesh, as FSDP2's "
                           f"fully_shard makes them; got {sharded[0].placements} on a {mesh.ndim}-D mesh")
    return mesh.get_group()


def _shard_of(p):
    """(rank, ranks) of a sharded parameter's mesh; () for a plain tensor."""
    return (p.device_mesh.get_local_rank(), p.device_mesh.size()) if hasattr(p, "device_mesh") else ()


def _check_replicas(group, threshold, step):
    """Raise on every rank unless every rank of `group` found the same threshold (its bits)."""
    bits = torch.tensor(threshold, dtype=torch.float32).view(torch.int32).item()
    low_high = torch.tensor([-bits, bits], dtype=torch.int64,
                            device="cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    torch.distributed.all_reduce(low_high, op=torch.distributed.ReduceOp.MAX, group=group)
    if -int(low_high[0]) != int(low_high[1]):
        raise RuntimeError(f"AdamWPrune: replicas disagree on the mask after step {step}: their thresholds "
                           "differ; ranks passed as check_replicas must hold identical weights and gradients (DDP)")
