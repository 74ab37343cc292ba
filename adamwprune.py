# SPDX-License-Identifier: MIT
"""
AdamWPrune: AdamW that prunes weights during training, ranking them by its own Adam states.
Copy this file into your project: it needs nothing but torch. It takes torch.optim.AdamW's
arguments, loads its state_dict, and works on FSDP2-sharded parameters as they are.

    optimizer = AdamWPrune(model.parameters(), lr=1e-3, sparsity=0.7,
                           prune_start=200, prune_end=2000, prune_every=50)  # in optimizer steps
    ...  # zero_grad, backward, optimizer.step() as with AdamW
    overall, per_tensor = optimizer.sparsity()  # fraction pruned, {parameter: fraction}

Algorithm. A parameter counts its own steps n (AdamW's bias correction); a param group counts
optimizer steps c (the pruning clock). w weight, g gradient, m = exp_avg, v = exp_avg_sq.
    1. AdamW on every parameter that has a gradient, n <- n + 1 (torch.optim.adamw.adamw does the
       arithmetic, in its fused kernel where the device has one):
           w <- w * (1 - lr * weight_decay)
           m <- beta1 * m + (1 - beta1) * g
           v <- beta2 * v + (1 - beta2) * g * g          (amsgrad: v_max <- max(v_max, v))
           w <- w - lr * (m / (1 - beta1^n)) / (sqrt(v / (1 - beta2^n)) + eps)
    2. If sparsity > 0 and mask_update_due(c) (prune_start <= c <= prune_end, on the prune_every
       grid or at prune_end), over the prunable tensors (2+ dimensions and trained, or the group's
       `prune`):
       a. k = min(round(s(c) * N), N - 1) of the N prunable weights, one always kept:
              cubic:  s(c) = sparsity * (1 - (1 - (c - prune_start) / (prune_end - prune_start))^3)
              linear: s(c) = sparsity * (c - prune_start) / (prune_end - prune_start)
       b. score each weight, higher = more important: variance |w| * v^(1/4) (the default),
          magnitude |w|, hybrid |w * m| * |w| / (sqrt(v) + eps), momentum |w| * sqrt(|m|). Pruned
          weights score -inf (a mask never un-prunes); one never trained has m = v = 0.
       c. find the k lowest scores of all tensors, ties by position (lowest_k: a radix select,
          16 bits of a key a pass; one tensor's scores exist at a time).
       d. prune: w <- 0, and the state takes the form below that is smaller.

State of a prunable tensor (this rank's shard; amsgrad adds max_exp_avg_sq beside exp_avg_sq):
    dense     step, exp_avg, exp_avg_sq     shaped like the tensor; a pruned weight has w = 0, v = +inf,
                                            so its step m / (sqrt(v) + eps) is zero whatever m is
    compact   step, kept_index (int32), kept_exp_avg, kept_exp_avg_sq: 1-D, the kept weights only;
              kept_index: their positions in memory order (flat_view) in this rank's shard
    A tensor turns compact for good at the first mask update where compact_is_smaller (fp32: over
    a third pruned, a quarter with amsgrad); its step decays the whole tensor and runs AdamW on the
    kept weights alone. State per prunable fp32 weight: AdamW's 8 B up to a third pruned, then
    12 (1 - s) B: 3.6 B at s = 0.7 (amsgrad 4.8 B, AdamW 12 B). Transient: a mask update, the
    largest tensor's scores and gathered weights (8 B per element), two bool masks over it and
    a few 512 KiB histograms; a step, 8 B per kept weight of the compact tensors.

State dict: state_dict() holds these forms; load_state_dict takes them (and torch.optim.AdamW's),
refusing state that does not fit the parameters. adamw_state_dict() is the dense form, for AdamW.

Caveats
    - One threshold per param group: keep all prunable tensors in one group (the default) for a
      global ranking; a group with its own `sparsity` is pruned to that fraction by itself.
    - Masks index a tensor's memory: load pretrained weights before the first mask update, and
      keep layouts (e.g. channels_last) fixed after it.
    - bf16/fp16: a compact tensor adds its change rounded to its dtype (one ulp from AdamW's).
    - FSDP2 (fully_shard: Shard(0) on a 1-D mesh): each rank steps, scores and keeps state for
      its own shard; the threshold's counts are summed over the mesh's group, so a sharded run
      prunes the weights one process would. Every rank calls step(); save state_dict() per rank.
      DDP: check_replicas compares the ranks' thresholds.
    - Not supported: sparse gradients, complex or meta parameters, capturable, differentiable.

References: AdamW, Loshchilov & Hutter 2019 (arXiv:1711.05101); the cubic schedule,
Zhu & Gupta 2017 (arXiv:1710.01878).
"""
import math
import warnings

import torch
from torch.optim.adamw import adamw

IMPORTANCES = ("hybrid", "variance", "momentum", "magnitude")
DEFAULT_IMPORTANCE = "variance"  # chosen by measurement: the ablation of the project's comparison
SCHEDULES = ("cubic", "linear")


def prunable(p, group):
    """Whether a tensor is pruned: trained (frozen tensors are never ranked against trained ones),
    and 2+ dimensions unless the group's `prune` says otherwise."""
    if not p.requires_grad:
        return False
    return group["prune"] if group.get("prune") is not None else p.dim() >= 2


def mask_update_due(step, group):
    """Whether masks change after optimizer step `step`: the schedule of every pruning method."""
    start, end = group["prune_start"], group["prune_end"]
    return group["sparsity"] > 0 and start <= step <= end and (
        (step - start) % group["prune_every"] == 0 or step == end)


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

    Each chain writes its first result into that tensor and then works in place: it is the whole
    transient memory of a score."""
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if out is None else out
    if importance == "hybrid":  # |w * m| * |w| / (sqrt(v) + eps)
        score = out.copy_(exp_avg_sq).sqrt_().add_(eps).reciprocal_()
        return score.mul_(exp_avg).mul_(weight).mul_(weight).abs_()
    if importance == "variance":  # |w| * v^(1/4)
        return torch.pow(exp_avg_sq, 0.25, out=out).mul_(weight).abs_()
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


# --- the k lowest scores: a radix select ---
BINS = 1 << 16  # a pass reads 16 bits of each key: the high half, then the low half
INSIDE = slice(1, BINS + 1)  # pass 2's slots of the chosen bin; slots 0 and BINS + 1 hold the keys outside it


def ordered_key(bits):
    """int32 keys that sort as the float32 values whose bits they are (NaN aside). A negative
    float's bits grow as the float falls, so there all bits but the sign are flipped. Its own inverse."""
    return (bits >> 31).bitwise_and_(0x7fffffff).bitwise_xor_(bits)


def lowest_k(score_fns, k, device, unscored=0, group=None):
    """The k lowest of all scores, as (threshold, marks), or None when there is nothing new to
    prune (the k lowest are pruned already) or a score is NaN or +inf (then with a warning).
    score_fns[i]() returns tensor i's scores, 1-D float32 on `device`, -inf where pruned (this
    overwrites them; a buffer may be reused: each is read before the next call); `unscored`
    counts pruned weights without a score, ranked lowest. marks yields (i, prune) one tensor at a
    time, and marks what a stable sort of all scores marks:

        everything = torch.cat([fn() for fn in score_fns])  # FSDP2 shards: rank by rank per tensor
        prune = torch.zeros(everything.numel(), dtype=torch.bool)
        prune[torch.sort(everything, stable=True).indices[:k - unscored]] = True
        marks = enumerate(prune.split([fn().numel() for fn in score_fns]))

    Here no two tensors' scores exist at once: pass 1 counts the high 16 bits of each score's key,
    pass 2 the low 16 bits inside the bin of the k-th, pass 3 marks. With a process group every
    rank holds shards of the same tensors: each count is summed over it, in the same collectives
    on every rank, and where only some of the scores equal to the threshold go, a 4th pass counts
    them on each rank, to break ties in one process's order."""

    def summed_over_ranks(counts):  # the one place where ranks talk
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        return counts.cpu()

    def scores(fn):  # -0.0 becomes 0.0: equal scores, equal keys
        return fn().add_(0.0)

    # 1) how many scores have each high half of their bits, and are any NaN or +inf?
    raw_counts = torch.zeros(BINS, dtype=torch.int64, device=device)
    non_finite = torch.zeros(1, dtype=torch.int64, device=device)
    for fn in score_fns:
        bits = scores(fn).view(torch.int32)
        if bits.numel():
            non_finite += ~(bits.view(torch.float32).max() < math.inf)
        raw_counts += torch.bincount(bits.bitwise_right_shift_(16).add_(BINS // 2), minlength=BINS)
    unscored = int(summed_over_ranks(torch.tensor([unscored], device=device)))
    if summed_over_ranks(non_finite):
        warnings.warn("AdamWPrune: non-finite importance scores; mask update skipped "
                      "(check for inf/nan weights or gradients)")
        return None
    bin_keys = torch.arange(-BINS // 2, BINS // 2, dtype=torch.int32) << 16  # each bin's first key, in order
    counts = summed_over_ranks(raw_counts)[(ordered_key(bin_keys) >> 16) + BINS // 2]  # the bins by value
    at_or_below = counts.cumsum(0) + unscored
    if k <= unscored:
        return None
    high_bin = int(torch.searchsorted(at_or_below, k))  # the bin of the k-th lowest
    below = int(at_or_below[high_bin - 1]) if high_bin else unscored
    high = high_bin - BINS // 2  # the high half of its key
    # 2) inside that bin, how many keys have each low half: a score's bits xor the bits of the bin's
    #    first key give its key's low half there, and a number outside [0, BINS) elsewhere, which the
    #    clamp sends to the slots outside
    first_bits = int(ordered_key(torch.tensor([high << 16], dtype=torch.int32)))
    low_counts = torch.zeros(BINS + 2, dtype=torch.int64, device=device)
    for fn in score_fns:
        slot = scores(fn).view(torch.int32).bitwise_xor_(first_bits).clamp_(-1, BINS).add_(1)
        low_counts += torch.bincount(slot, minlength=BINS + 2)
        del slot
    low_counts = summed_over_ranks(low_counts)[INSIDE]
    at_or_below = low_counts.cumsum(0) + below
    low = int(torch.searchsorted(at_or_below, k))
    key = torch.tensor([(high << 16) | low], dtype=torch.int32)
    threshold = ordered_key(key).view(torch.float32).item()  # the k-th lowest score
    if threshold == -math.inf:
        return None
    equal = int(low_counts[low])
    ties = k - (int(at_or_below[low]) - equal)  # how many of the scores equal to it are pruned
    # 3) marks; where only some of the equal scores go, shards need the ties on earlier ranks
    ties_before = None
    if ties < equal and group is not None:
        mine = torch.tensor([int((scores(fn) == threshold).count_nonzero()) for fn in score_fns], device=device)
        every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(every, mine, group=group)
        every = torch.stack(every).cpu()  # (ranks, tensors)
        per_tensor, rank = every.sum(0), torch.distributed.get_rank(group)
        ties_before = (per_tensor.cumsum(0) - per_tensor + every[:rank].sum(0)).tolist()

    def marks():
        taken = 0
        for i, fn in enumerate(score_fns):
            score = fn()  # float compares: -0.0 == 0.0
            prune = score <= threshold if ties == equal else score < threshold
            if ties < equal:
                before = taken if ties_before is None else ties_before[i]
                tied = (score == threshold).nonzero().flatten()[:max(0, ties - before)]
                prune[tied] = True
                taken += tied.numel()
            del score
            yield i, prune
    return threshold, marks()


def prune_lowest(params, group, score, apply, unscored=0, check_replicas=None):
    """One mask update, for AdamWPrune and every other pruning method: of the prunable `params`
    (one param group: `group` holds the schedule's options and its clock, optimizer_step), find
    the k lowest scores, k from the schedule, and call apply(p, prune) for each tensor with new
    marks. score(p) gives p's flat float32 scores, -inf where pruned; `unscored` counts pruned
    weights without a score; check_replicas: as AdamWPrune's."""
    step = group["optimizer_step"]
    target = scheduled_sparsity(step, group["sparsity"], group["schedule"], group["prune_start"],
                                group["prune_end"])
    k = target_count(target, sum(p.numel() for p in params))  # p.numel(): the whole tensor
    score_fns = [lambda p=p: score(p) for p in params]
    found = lowest_k(score_fns, k, local(params[0]).device, unscored, _process_group(params))
    for i, prune in found[1] if found else []:
        apply(params[i], prune)
    if check_replicas is not None:
        check_replicas_agree(check_replicas, found[0] if found else math.nan, step)


# --- the optimizer ---
CHECKS = [  # (option, allowed, what is allowed)
    *[(name, lambda v: v >= 0.0, "must be >= 0") for name in ("lr", "eps", "weight_decay")],
    ("capturable", lambda v: not v, "must be False: CUDA graphs cannot follow a state whose size changes"),
    ("differentiable", lambda v: not v, "must be False: the masks are not differentiable"),
    ("sparsity", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("importance", lambda v: v in IMPORTANCES, f"choose from {', '.join(IMPORTANCES)}"),
    ("schedule", lambda v: v in SCHEDULES, f"choose from {', '.join(SCHEDULES)}"),
    ("prune_start", lambda v: v >= 0, "must be >= 0"),
    ("prune_every", lambda v: v >= 1, "must be >= 1"),
    ("prune", lambda v: v in (None, True, False), "must be True, False or None for 2+ dims"),
]


def _check_options(o):
    for name, allowed, rule in CHECKS:
        if not allowed(o[name]):
            raise ValueError(f"Invalid {name}: {o[name]!r} ({rule})")
    if len(o["betas"]) != 2:
        raise ValueError(f"Invalid betas: {o['betas']} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(o["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta} (must be in [0, 1))")
    if o["fused"] and o["foreach"]:
        raise ValueError("Invalid fused: True with foreach=True (must choose one of the two)")
    if o["importance"] == "hybrid" and not o["eps"] > 0:
        raise ValueError(f"Invalid eps: {o['eps']} (must be > 0 for importance='hybrid', which divides by it)")
    if not o["prune_end"] >= o["prune_start"]:
        raise ValueError(f"Invalid prune_end: {o['prune_end']} (must be >= prune_start = {o['prune_start']})")


def compact_is_smaller(kept, numel, moments, element_size):
    """The break-even of the two forms: an int32 index and the moments of the kept weights only,
    against the moments of every weight."""
    return kept * (4 + moments * element_size) < numel * moments * element_size


def _check_state(state, param, where):
    """Raise unless saved state fits its parameter: its shard, dense moments shaped like it,
    compact ones like kept_index, whose positions lie inside it."""
    saved_on, loaded_on = tuple(state.get("shard", ())), _shard_of(param)
    if saved_on != loaded_on:
        on = lambda shard: f"rank {shard[0]} of {shard[1]}" if shard else "an unsharded parameter"
        raise RuntimeError(
            f"AdamWPrune: optimizer state saved on {on(saved_on)} is loaded on {on(loaded_on)}: under FSDP2 "
            "each rank saves and loads its own optimizer.state_dict() (torch.save, one file per rank), at the "
            "same world size. torch.distributed.checkpoint keeps only one rank's copy of AdamWPrune's per-rank "
            "state, so it cannot be used")
    index, numel = state.get("kept_index"), local(param).numel()
    shape = tuple(local(param).shape) if index is None else (index.numel(),)
    wrong = [f"{key} has shape {tuple(value.shape)} where {shape} fits" for key, value in state.items()
             if "exp_avg" in key and tuple(value.shape) != shape]
    if index is not None and (index.dim() != 1 or index.is_floating_point() or index.numel() and not (
            0 <= int(index.min()) and int(index.max()) < numel)):
        wrong.insert(0, f"kept_index ({tuple(index.shape)}, {index.dtype}) is no list of positions of {numel}")
    if index is not None and tuple(state.get("shape", local(param).shape)) != tuple(local(param).shape):
        wrong.insert(0, f"its compact state is of a tensor of shape {tuple(state['shape'])}, this one is "
                        f"{tuple(local(param).shape)}")
    if wrong:
        raise ValueError(f"AdamWPrune.load_state_dict: {where}: {wrong[0]}: the state was saved for another "
                         "model, or its parameters in another order; load it into an optimizer over those")


class AdamWPrune(torch.optim.Optimizer):
    """AdamW that prunes during training by its own states; the module docstring has the algorithm.

    Args:
        params: parameters or param groups; a group may override any option below and set
            `prune` (True/False) to choose its tensors (default: tensors of 2+ dimensions)
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as torch.optim.AdamW
            (defaults: 1e-3, (0.9, 0.999), 1e-8, 1e-2, False, False, None)
        fused: torch's fused kernel; None picks it where every parameter is on the CPU or CUDA,
            unless foreach=True (default: None)
        capturable, differentiable: AdamW's; must be False (default: False)
        sparsity: final fraction of prunable weights set to zero, in [0, 1) (default: 0.7)
        importance: variance, magnitude, hybrid or momentum (default: DEFAULT_IMPORTANCE, variance)
        schedule: cubic or linear growth of sparsity (default: "cubic")
        prune_start: optimizer step where pruning starts (default: 200)
        prune_end: optimizer step where the final sparsity is reached (default: 2000)
        prune_every: optimizer steps between mask updates (default: 50)
        check_replicas: a process group whose ranks hold the same parameters (DDP): after each
            mask update they compare thresholds and raise if any differ (default: None)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, sparsity=0.7, importance=DEFAULT_IMPORTANCE,
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
        param_group.setdefault("optimizer_step", 0)  # the pruning clock, c
        super().add_param_group(param_group)
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if p.is_complex() or local(p).is_meta:
                raise ValueError(f"AdamWPrune: parameter {i} of param group {len(self.param_groups) - 1} is "
                                 + ("complex: train it with torch.optim.AdamW in an optimizer of its own" if
                                    p.is_complex() else "on the meta device, with no values yet: materialise the "
                                    "model (model.to_empty(device=...), then initialise it) first"))
        self._pick_kernel(self.param_groups[-1])

    def __getstate__(self):  # copy.deepcopy and pickle: torch's Optimizer keeps defaults, state and groups
        return {**super().__getstate__(), "check_replicas": self.check_replicas}

    def __setstate__(self, state):
        # load_state_dict comes here: group keys a state_dict lacks (torch.optim.AdamW's, an older
        # AdamWPrune's) take the defaults, and the clock the steps taken so far
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            steps = [int(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
            group.setdefault("optimizer_step", max(steps, default=0))
            _check_options(group)
            self._pick_kernel(group)

    @staticmethod
    def _pick_kernel(group):
        if group["fused"] is None and not group["foreach"]:
            group["fused"] = all(local(p).device.type in ("cpu", "cuda") for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["optimizer_step"] += 1
            self._adamw_step(group)
            if mask_update_due(group["optimizer_step"], group):
                self._update_masks(group)
        return loss

    def sparsity(self):
        """Fraction of prunable weights pruned: (overall, {parameter: fraction}); this rank's shards."""
        counts = {p: (self._pruned_count(p), local(p).numel())
                  for group in self.param_groups for p in group["params"] if prunable(p, group)}
        numel = sum(n for _, n in counts.values())
        overall = sum(pruned for pruned, _ in counts.values()) / numel if numel else 0.0
        return overall, {p: pruned / n if n else 0.0 for p, (pruned, n) in counts.items()}

    def kept_mask(self, p):
        """A bool tensor shaped like p (this rank's shard of it): True where the weight is kept."""
        state = self.state.get(p, {})
        if "kept_index" not in state:
            return state["exp_avg_sq"] != math.inf if state else torch.ones_like(local(p), dtype=torch.bool)
        mask = torch.zeros_like(local(p), dtype=torch.bool)
        flat_view(mask)[state["kept_index"]] = True
        return mask

    # --- the state dict ---

    def load_state_dict(self, state_dict):
        # state that does not fit its parameter is refused before any loads (torch's fused kernel
        # checks no shapes: it would step on it, or crash); an older AdamWPrune's compact moments
        # are renamed
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [(p, group, f"param group {g}, parameter {i}") for g, group in enumerate(self.param_groups)
                  for i, p in enumerate(group["params"])]
        for pid, (p, _, where) in zip(saved_ids, params):
            state = state_dict["state"].get(pid)
            if state and "kept_index" in state and "exp_avg" in state:
                state = state_dict["state"][pid] = {("kept_" if "exp_avg" in key else "") + key: value
                                                    for key, value in state.items()}
            if state and len(saved_ids) == len(params):  # else torch's loader names the mismatch
                _check_state(state, p, where)
        # torch's loader casts every state tensor of a float parameter to its dtype (see
        # Optimizer._process_value_according_to_param_policy): indices must stay int32
        indices = {pid: s["kept_index"] for pid, s in state_dict["state"].items() if "kept_index" in s}
        super().load_state_dict(state_dict)
        for pid, (p, group, _) in zip(saved_ids, params):
            state = self.state.get(p)
            if state and pid in indices:
                state["kept_index"] = indices[pid].to(device=local(p).device, dtype=torch.int32)
            if state:  # steps as tensors, on the parameter's device for the fused kernel (AdamW keeps
                # them on the CPU otherwise, an older AdamWPrune as ints)
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(
                    local(p).device if group["fused"] else "cpu")

    def adamw_state_dict(self, keep_pruned=True):
        """This state_dict in torch.optim.AdamW's dense form, to go back to AdamW (unsharded
        parameters). keep_pruned: pruned weights keep v = +inf, so AdamW steps as this optimizer
        does once pruning has ended and they stay zero; False: their m and v are 0, and regrow."""
        saved, params = self.state_dict(), [p for group in self.param_groups for p in group["params"]]
        for pid, state in saved["state"].items():
            if "shard" in state:
                raise ValueError("adamw_state_dict: the parameters are FSDP2 shards, whose AdamW state is "
                                 "DTensors: gather the model into one process first")
            state = saved["state"][pid] = dict(state)
            index, _ = state.pop("kept_index", None), state.pop("shape", None)
            pruned = None if index is not None else state["exp_avg_sq"] == math.inf
            for key in [key for key in state if "exp_avg" in key]:
                if index is not None:  # zeros, or +inf for v, where pruned; the kept values at kept_index
                    value = torch.full_like(params[pid], math.inf if keep_pruned and "sq" in key else 0.0)
                    flat_view(value).index_copy_(0, index.long(), state.pop(key))
                    state[key[len("kept_"):]] = value
                elif not keep_pruned:
                    state[key] = state[key].masked_fill(pruned, 0.0)
        return saved

    # --- the AdamW step ---

    def _adamw_step(self, group):
        lists = lambda: dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[], state_steps=[])
        dense, compact = lists(), lists()  # compact: AdamW on the kept weights alone
        compacted = []  # (param, grad, kept_index) of the compact tensors
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamWPrune does not support sparse gradients; use dense "
                                   "gradients (e.g. nn.Embedding(sparse=False))")
            state = self.state[p]
            if not state:
                self._init_state(p, group)
            param, grad = local(p), local(p.grad)
            if grad.stride() != param.stride():  # the fused kernel and flat views need one layout
                grad = torch.empty_like(param).copy_(grad)
            if "kept_index" in state:
                compacted.append((param, grad, state["kept_index"]))
                into, prefix = compact, "kept_"
            else:
                dense["params"].append(param)
                dense["grads"].append(grad)
                into, prefix = dense, ""
            into["exp_avgs"].append(state[prefix + "exp_avg"])
            into["exp_avg_sqs"].append(state[prefix + "exp_avg_sq"])
            if group["amsgrad"]:
                into["max_exp_avg_sqs"].append(state[prefix + "max_exp_avg_sq"])
            into["state_steps"].append(state["step"])
        beta1, beta2 = group["betas"]
        options = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"], eps=group["eps"],
                       maximize=group["maximize"], foreach=group["foreach"], fused=group["fused"])
        if dense["params"]:
            adamw(**dense, weight_decay=group["weight_decay"], **options)
        if compacted:
            self._compact_step(compacted, compact, group, options)

    @staticmethod
    def _compact_step(compacted, lists, group, options):
        """AdamW with weight_decay=0 on a zeroed change tensor per compact tensor, from its gathered
        kept gradients: the change ends up holding the step, which index_add_ adds at kept_index
        after the whole tensor is decayed (its pruned weights are zero)."""
        # the changes and gathered gradients live in one block per device and dtype (one allocation
        # a step: on the CPU, fresh pages for many large ones cost more than the gathers)
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
            torch.index_select(flat_view(grad), 0, kept_index, out=kept_grad)
            lists["params"].append(change)
            lists["grads"].append(kept_grad)
            param.mul_(1 - group["lr"] * group["weight_decay"])
        adamw(**lists, weight_decay=0.0, **options)
        for (param, _, kept_index), change in zip(compacted, lists["params"]):
            flat_view(param).index_add_(0, kept_index, change)

    def _init_state(self, p, group):
        param, state = local(p), self.state[p]
        # AdamW's step count n, a tensor where torch's kernels want it
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if group["fused"] else "cpu")
        # running average of the gradient, m (first moment)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        # running average of the squared gradient, v (second moment); +inf marks a pruned weight
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:  # the largest v so far, v_max
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if hasattr(p, "device_mesh"):  # a shard's state is its rank's alone: (rank, ranks)
            state["shard"] = _shard_of(p)

    # --- pruning ---

    def _pruned_count(self, p):
        state = self.state.get(p, {})
        if "kept_index" in state:
            return local(p).numel() - state["kept_index"].numel()
        return int((state["exp_avg_sq"] == math.inf).count_nonzero()) if "exp_avg_sq" in state else 0

    def _score(self, p, group, scratch, has_pruned):
        """Importance of p's scored positions (float32, flat), all or the kept ones, in `scratch`."""
        state, weight = self.state[p], flat_view(local(p))
        if "kept_index" in state:
            weight = weight.index_select(0, state["kept_index"])
            exp_avg, exp_avg_sq = state["kept_exp_avg"], state["kept_exp_avg_sq"]
        else:
            exp_avg, exp_avg_sq = flat_view(state["exp_avg"]), flat_view(state["exp_avg_sq"])
        score = importance_score(group["importance"], weight, exp_avg, exp_avg_sq, group["eps"],
                                 out=scratch[:weight.numel()])
        if has_pruned and "kept_index" not in state:  # a dense tensor's pruned weights: v = +inf
            score.masked_fill_(exp_avg_sq == math.inf, -math.inf)
        return score

    def _update_masks(self, group):
        params = [p for p in group["params"] if prunable(p, group)]
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self._init_state(p, group)
        pruned = {p: self._pruned_count(p) for p in params}  # a compacted tensor's pruned weights have no score
        unscored = sum(pruned[p] for p in params if "kept_index" in self.state[p])
        scratch = torch.empty(max(local(p).numel() for p in params), dtype=torch.float32,
                              device=local(params[0]).device)
        prune_lowest(params, group, lambda p: self._score(p, group, scratch, pruned[p] > 0),
                     lambda p, prune: self._apply_prune(p, group, prune), unscored, self.check_replicas)

    def _apply_prune(self, p, group, prune):
        """Zero the weights where `prune` (over p's scored positions) and shrink p's state."""
        state, flat = self.state[p], flat_view(local(p))
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        compact = "kept_index" in state
        kept = flat.numel() - int(prune.count_nonzero())
        if not compact and not compact_is_smaller(kept, flat.numel(), len(moments), flat.element_size()):
            flat.masked_fill_(prune, 0)
            for key in moments[1:]:  # v = +inf: the step of a pruned weight is zero from now on
                flat_view(state[key]).masked_fill_(prune, math.inf)
            return
        kept_at = (~prune).nonzero().flatten()  # among the scored positions
        state["kept_index"] = state["kept_index"].index_select(0, kept_at) if compact else kept_at.to(torch.int32)
        state["shape"] = tuple(local(p).shape)  # what kept_index indexes, checked on load
        for key in moments:
            moment = state.pop("kept_" + key) if compact else flat_view(state.pop(key))
            state["kept_" + key] = moment.index_select(0, kept_at)
        kept_weights = flat.index_select(0, state["kept_index"])
        flat.zero_().index_add_(0, state["kept_index"], kept_weights)  # (faster than a masked fill)


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


def check_replicas_agree(group, threshold, step):
    """Raise on every rank unless every rank of `group` found the same threshold (its bits)."""
    bits = torch.tensor(threshold, dtype=torch.float32).view(torch.int32).item()
    low_high = torch.tensor([-bits, bits], dtype=torch.int64,
                            device="cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu")
    torch.distributed.all_reduce(low_high, op=torch.distributed.ReduceOp.MAX, group=group)
    if -int(low_high[0]) != int(low_high[1]):
        raise RuntimeError(f"AdamWPrune: replicas disagree on the mask after step {step}: their thresholds "
                           "differ; ranks passed as check_replicas must hold identical weights and gradients (DDP)")


# --- the pruned model, smaller on disk ---
def compact_state_dict(model_or_state_dict, values_dtype=None):
    """A state_dict whose float tensors, where smaller so, are their non-zero values (as values_dtype,
    if given) and positions: a bitmask 8 to a byte, or int32 indices. Loads with weights_only=True."""
    state = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    compact = {}
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise TypeError(f"compact_state_dict: {name!r} is a {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().reshape(-1).cpu()
        kept = flat != 0
        count = int(kept.count_nonzero())
        where_bytes = min((flat.numel() + 7) // 8, 4 * count)  # a bitmask or int32 indices
        compact[name], value_bytes = tensor, (values_dtype or tensor.dtype).itemsize
        if not tensor.is_floating_point() or count * value_bytes + where_bytes >= tensor.nbytes:
            continue
        compact[name] = entry = {"shape": tuple(tensor.shape), "dtype": tensor.dtype,
                                 "values": flat[kept].to(values_dtype or tensor.dtype)}
        if where_bytes < 4 * count:
            bits = torch.nn.functional.pad(kept, (0, -flat.numel() % 8)).view(-1, 8).to(torch.uint8)
            entry["bitmask"] = (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
        else:
            entry["indices"] = kept.nonzero().flatten().to(torch.int32)
    return compact


def dense_state_dict(compact):
    """The plain state_dict of a compact_state_dict, for model.load_state_dict(strict=True)."""
    dense = {}
    for name, entry in compact.items():
        if torch.is_tensor(entry):
            dense[name] = entry
            continue
        try:
            numel = math.prod(entry["shape"])
            if "bitmask" in entry:
                where = (entry["bitmask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8) & 1).bool().flatten()
                if where.numel() != (numel + 7) // 8 * 8 or where[numel:].any():
                    raise ValueError(f"a bitmask of {where.numel()} bits for {numel} elements")
                where = where[:numel]
            else:
                where = torch.zeros(numel, dtype=torch.bool)
                where[entry["indices"].long()] = True
            tensor = torch.zeros(numel, dtype=entry["dtype"])
            tensor[where] = entry["values"].to(entry["dtype"])  # raises unless the counts agree
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError) as error:
            raise ValueError(f"dense_state_dict: entry {name!r} is not a compact tensor ({error}); the file "
                             "is damaged or was not written by compact_state_dict") from None
        dense[name] = tensor.view(entry["shape"])
    return dense
