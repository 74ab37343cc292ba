"""
Memory measurement for training runs, on CUDA and on the CPU; the memory/speed and data-path benchmarks.

    $ python memory.py                 # state bytes, step time and mask updates, against AdamW(fused=True)
    $ python -c "import memory; print(memory.measure_data_path(['--optimizer', 'adamw']))"  # train.py's data path

What is measured, and how:
- persistent training state, by category (parameters, gradients, optimizer state, pruning
  buffers, model buffers), counted exactly by walking the tensors; a storage shared by several
  tensors (views, tied weights) is counted once. Works on any device.
- on CUDA, the caching allocator's own figures: `memory_allocated`, `memory_reserved` and the
  run's peaks, `max_memory_allocated` and `max_memory_reserved` (reset at the start of the run).
"""
import argparse
import contextlib
import copy
import gc
import io
import os
import resource
import statistics
import sys
import time
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adamwprune import local, prunable

# --- accounting of persistent state ---


def storage_of(tensor):
    """The storage behind a tensor; for a sharded DTensor (FSDP2), behind this rank's shard."""
    return local(tensor).untyped_storage()


def tensor_bytes(tensors, seen=None):
    """Bytes of the storages behind `tensors`, each storage counted once (views share one)."""
    seen = set() if seen is None else seen
    total_bytes = 0
    for t in tensors:
        if t is None:
            continue
        storage = storage_of(t)
        key = (t.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total_bytes += storage.nbytes()
    return total_bytes


def training_tensors(model, optimizer, pruning_buffers=()):
    """Every tensor of the persistent training state (a storage may appear more than once)."""
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    yield from state_tensors(optimizer)
    yield from pruning_buffers
    yield from model.buffers()


def state_tensors(optimizer, params=None):
    """Every tensor in optimizer.state (for `params` only, when given)."""
    wanted = None if params is None else {id(p) for p in params}
    for p, state in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for value in state.values():
            if torch.is_tensor(value):
                yield value


def optimizer_state_bytes(optimizer, params=None):
    """Bytes held in optimizer.state (for `params` only, when given)."""
    return tensor_bytes(state_tensors(optimizer, params))


def training_state_bytes(model, optimizer, pruning_buffers=()):
    """Persistent training memory by category, in bytes, each storage counted once overall."""
    seen = set()
    params = list(model.parameters())
    categories = {
        "parameters": tensor_bytes(params, seen),
        "gradients": tensor_bytes((p.grad for p in params), seen),
        "optimizer_state": tensor_bytes(state_tensors(optimizer), seen),
        "pruning_buffers": tensor_bytes(pruning_buffers, seen),
        "model_buffers": tensor_bytes(model.buffers(), seen),
    }
    categories["total"] = sum(categories.values())
    return categories


def format_bytes(n):
    """Human-readable bytes: '512 B', '12.3 KiB', '45.6 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# --- peak of all tensor memory in a region, on any device ---


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at once.

    Every operator's outputs pass through `__torch_dispatch__`; each new storage is counted
    when it appears and uncounted when it is freed (a weak reference on the storage, whose
    Python object lives exactly as long as the storage does). Tensors that existed before the
    block are not counted unless passed as `existing` (e.g. the persistent training state): then
    the peak is the whole tensor memory of the region. Works on the CPU, where torch keeps no
    allocator statistics.

        with TensorMemoryTracker() as tracker:
            loss = model(x).sum(); loss.backward()
        tracker.peak_bytes
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storage_refs = {}  # id(storage) -> weak reference, while the storage is alive
        for t in existing:  # counted from the start, and uncounted if the region frees them
            self._count(storage_of(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(storage_of(t)) for t in tensors_in((args, kwargs))}
        for t in tensors_in(out):
            if id(storage := storage_of(t)) not in inputs:  # views, in-place: not new
                self._count(storage)
        return out

    def _count(self, storage):
        key, nbytes = id(storage), storage.nbytes()
        if key in self._storage_refs or nbytes == 0:
            return
        self._storage_refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, key, nbytes):
        self._storage_refs.pop(key, None)
        self.live_bytes -= nbytes


def tensors_in(value):
    """The tensors in an operator's arguments or outputs: tensors, lists, tuples and dicts of them (a plain
    walk: at every operator of a tracked step, torch's general tree_flatten costs as much as the step)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


# --- a run's memory timeline ---


class MemoryMonitor:
    """The memory of a training run: a timeline sampled every `every` steps, and its peak.

        monitor = MemoryMonitor(device, every=50)
        for step in range(1, steps + 1):
            with monitor.step(step, model, optimizer, pruning_buffers):
                ...  # forward, backward, optimizer step, pruning step
        monitor.report()  # {"peak_bytes", "mean_bytes", "timeline", ...}

    A sampled step adds to the timeline: allocated_bytes and reserved_bytes after the step, and
    step_peak_bytes, the most tensor memory alive at once during it (activations, gradients and
    temporaries included).
    - CUDA: the caching allocator's memory_allocated, memory_reserved and max_memory_allocated
      (reset before each sampled step; the peak of the steps between samples is kept too); the
      report adds the run's max_memory_reserved, which the CPU has no counterpart for (None).
    - CPU: a TensorMemoryTracker over the sampled step, starting from the persistent training
      state (parameters, gradients, optimizer state, pruning buffers, model buffers), which is
      counted exactly; reserved equals allocated (no caching allocator to report). The peak is
      over the sampled steps only (train.py samples every mask update too), and leaves out the
      data set and input batch, which CUDA's allocator counts when they live on the GPU.
    The process's peak resident set size is reported alongside, as context only: it includes the
    Python interpreter, libraries and data set.
    """

    def __init__(self, device, every=1):
        self.device = torch.device(device)
        self.every = every
        self.timeline = []
        self.cuda_peak_bytes = self.cuda_peak_reserved_bytes = 0  # CUDA: the highest max_memory_* before a reset
        if self.device.type == "cuda":  # what an earlier run left (train.py --compare runs them in one process)
            gc.collect()  # is freed, and its cached blocks go back: the peaks are this run's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def step(self, step, model, optimizer, pruning_buffers=(), sample=None):
        """Measure this training step when it is due (`step % every == 0`, or `sample=True`)."""
        if not (step % self.every == 0 if sample is None else sample):
            yield
            return
        if self.device.type == "cuda":
            self.cuda_peak_bytes = max(self.cuda_peak_bytes, torch.cuda.max_memory_allocated(self.device))
            self.cuda_peak_reserved_bytes = max(self.cuda_peak_reserved_bytes,
                                                torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            step_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            allocated_bytes = torch.cuda.memory_allocated(self.device)
            reserved_bytes = torch.cuda.memory_reserved(self.device)
        else:
            with TensorMemoryTracker(existing=training_tensors(model, optimizer, pruning_buffers)) as tracker:
                yield
            step_peak_bytes = tracker.peak_bytes
            allocated_bytes = reserved_bytes = training_state_bytes(model, optimizer, pruning_buffers)["total"]
        self.timeline.append({"step": step, "allocated_bytes": allocated_bytes,
                              "reserved_bytes": reserved_bytes, "step_peak_bytes": step_peak_bytes})

    def report(self):
        allocated = [s["allocated_bytes"] for s in self.timeline] or [0]
        peak_bytes, peak_reserved_bytes = max([s["step_peak_bytes"] for s in self.timeline] + [0]), None
        if self.device.type == "cuda":
            source = "CUDA caching allocator: memory_allocated, max_memory_allocated, max_memory_reserved"
            peak_bytes = max(peak_bytes, self.cuda_peak_bytes, torch.cuda.max_memory_allocated(self.device))
            peak_reserved_bytes = max(self.cuda_peak_reserved_bytes, torch.cuda.max_memory_reserved(self.device))
        else:
            source = "tensor storages: persistent state counted exactly, sampled steps tracked by dispatch"
        return {
            "device": str(self.device),
            "source": source,
            "peak_bytes": peak_bytes,
            "peak_reserved_bytes": peak_reserved_bytes,
            "mean_bytes": statistics.fmean(allocated),
            "timeline": self.timeline,
            "process_peak_rss_bytes": process_peak_rss_bytes(),
        }


def process_peak_rss_bytes():
    """The process's peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- the benchmark: state bytes, peak step memory and update time of every pairing ---

def pairings():
    """(optimizer, pruning) of each row of the comparison: train.py's STUDY, dense AdamW first and
    AdamWPrune last."""
    import train
    rows = [(optimizer, pruning) for _, optimizer, pruning, _ in train.STUDY]
    return sorted(rows, key=lambda row: (row != ("adamw", "none"), row[0] == "adamwprune"))
BATCH_SIZE = {"lenet5": 128, "resnet18": 32, "gpt-tiny": 12, "gpt2": 1}  # small enough for a CPU; every row's
ONE_AT_A_TIME = ("gpt2",)  # too large for all its rigs in memory at once: benchmark_alone


class Rig:
    """One model with one optimizer/pruning pairing, brought to a phase of pruning, stepping on
    one fixed random batch."""

    def __init__(self, model_name, optimizer, pruning, sparsity, device, prune_end=1, wrap=None,
                 batch_size=None, context=None, amp="none"):
        import train
        from models import GPT, GPT_SHAPES
        gpt = GPT_SHAPES.get(model_name)  # any GPT shape takes train.py's GPT recipe (groups, betas, clipping)
        config = train.parse_args(["--model", "gpt" if gpt else model_name, "--optimizer", optimizer,
                                   "--pruning", pruning, "--sparsity", str(sparsity), "--device", str(device),
                                   "--amp", amp],
                                  writes=False)
        # prune_end=1: straight to `sparsity` at the first step, the steady state after prune_end;
        # prune_end=2: 61% at the first step (cubic), `sparsity` at the second, a late mask update
        config.update(prune_start=0 if prune_end > 1 else 1, prune_end=prune_end, prune_every=1)
        torch.manual_seed(0)
        if gpt:  # built on the device itself: GPT-2's 124M weights are drawn in seconds on a CPU, at once on a GPU
            with torch.device(device):
                self.model = GPT(**gpt)
        else:
            self.model = train.make_model(config, device)
        if wrap:  # e.g. FSDP2's fully_shard, before the optimizer sees the parameters
            wrap(self.model)
        self.optimizer, self.scheduler, self.pruning = train.make_optimizer(config, self.model, total_steps=10**6)
        self.config, self.train_update, self.autocast = config, train.update, train.autocast
        g, batch = torch.Generator().manual_seed(0), batch_size or BATCH_SIZE[model_name]
        if gpt:  # random tokens, a context each (at most the block size); the targets: the next tokens
            length = (context or gpt["block_size"]) + 1
            tokens = torch.randint(0, gpt["vocab_size"], (batch, length), generator=g).to(device)
            self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        else:
            channels, side = train.DATASETS[config["dataset"]][1:3]
            self.x = torch.randn(batch, channels, side, side, generator=g).to(device)
            self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.prunable = [p for p in self.model.parameters() if prunable(p, {})]  # AdamWPrune's rule

    def backward(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(self.config):  # --amp bf16: CUDA's bf16 autocast, as train.py runs it
            logits = self.model(self.x)  # (B, classes), or (B, T, vocabulary) for the GPT
        torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), self.y.flatten()).backward()

    def update(self):
        """What a training step of train.py does after backward (optimizer, schedule, pruning)."""
        self.train_update(self.config, self.model, self.optimizer, self.scheduler, self.pruning)

    def train_step(self):
        self.backward()
        self.update()

    def buffers(self):
        return self.pruning.buffers() if self.pruning else []

    def bytes_per_prunable(self):
        """(optimizer state, pruning buffers) in bytes per prunable weight."""
        numel = sum(p.numel() for p in self.prunable)
        return optimizer_state_bytes(self.optimizer, self.prunable) / numel, tensor_bytes(self.buffers()) / numel

    def peak_step_bytes(self):
        """(allocated, reserved): the most tensor memory alive at once during one training step, all of
        it (state included); and on CUDA the most the caching allocator held meanwhile (None on the CPU).
        On CUDA, memory of anything else on the device is left out (benchmark() keeps one rig there)."""
        device = self.x.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            others_bytes = torch.cuda.memory_allocated(device) - tensor_bytes(
                training_tensors(self.model, self.optimizer, self.buffers()))
            torch.cuda.reset_peak_memory_stats(device)
            self.train_step()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - others_bytes, torch.cuda.max_memory_reserved(device)
        with TensorMemoryTracker(existing=training_tensors(self.model, self.optimizer, self.buffers())) as tracker:
            self.train_step()
        return tracker.peak_bytes, None


def memory_figures(rig):
    """A benchmark row's memory columns for a rig: the sparsity reached, state and pruning bytes per
    prunable weight, the optimizer state in bytes, and the peak of its next training step."""
    peak_bytes, peak_reserved_bytes = rig.peak_step_bytes()
    state_bytes, pruning_bytes = rig.bytes_per_prunable()
    return {"sparsity": sum(int((p == 0).sum()) for p in rig.prunable) / sum(p.numel() for p in rig.prunable),
            "state_bytes_per_prunable": state_bytes, "pruning_bytes_per_prunable": pruning_bytes,
            "optimizer_state_bytes": optimizer_state_bytes(rig.optimizer), "peak_step_bytes": peak_bytes,
            "peak_reserved_bytes": peak_reserved_bytes}


def median_seconds(actions, repeats, warmup=2):
    """Median seconds of each action, run in a new random order every round so that changes in
    machine load fall on all of them alike."""
    import random
    rng = random.Random(0)
    seconds = {name: [] for name in actions}
    for round_index in range(warmup + repeats):
        for name in rng.sample(list(actions), len(actions)):
            if torch.cuda.is_initialized():  # work on a GPU: wait for it
                torch.cuda.synchronize()
            start = time.perf_counter()
            actions[name]()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def settled_rig(model_name, optimizer, pruning, sparsity, device):
    rig = Rig(model_name, optimizer, pruning, sparsity, device)
    for _ in range(2):  # create the state, prune (at step 1), settle
        rig.train_step()
    return rig


def benchmark(model_name, device, repeats, sparsity=0.7):
    """Rows for a model: each pairing before pruning and at `sparsity`, timed in one interleaved
    run against torch's AdamW stepping the same gradients, fused (the fastest) and foreach; and
    what one mask update adds to a step, in fused AdamW steps."""
    rows, phases = [], [(optimizer, pruning, phase, target) for optimizer, pruning in pairings()
                        for phase, target in (("before", 0.0), ("pruned", sparsity))
                        if pruning != "none" or phase == "before"]
    for optimizer, pruning, phase, target in phases:  # 1) memory, each rig alone on the device
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()  # the last rig's blocks go back: the reserved peak is this rig's
        rig = settled_rig(model_name, optimizer, pruning, target, device)
        rows.append({"model": model_name, "optimizer": optimizer, "pruning": pruning, "phase": phase,
                     **memory_figures(rig), "key": (optimizer, pruning, phase)})
        del rig
    # 2) time, every rig on the device at once, stepping in turn
    updates = {kernel: adamw_update(model_name, device, kernel) for kernel in ("fused", "foreach")}
    for optimizer, pruning, phase, target in phases:
        rig = settled_rig(model_name, optimizer, pruning, target, device)
        rig.backward()  # gradients for the timed updates
        updates[optimizer, pruning, phase] = rig.update
    seconds = median_seconds(updates, repeats)
    for row in rows:
        key = row.pop("key")
        row["update_seconds"] = seconds[key]
        row["vs_fused"] = seconds[key] / seconds["fused"]
        row["vs_foreach"] = seconds[key] / seconds["foreach"]
        if row["phase"] == "pruned":
            row["mask_update_fused_steps"] = mask_update_fused_steps(model_name, *key[:2], sparsity, device,
                                                                     repeats, updates["fused"])
    return rows


def adamw_update(model_name, device, kernel="fused"):
    """The update after backward of torch's AdamW (fused=True or foreach=True) on a model's gradients, as a
    step of train.py makes it (the GPT clips the gradients first): the speed reference."""
    reference = Rig(model_name, "adamw", "none", 0.0, device)
    reference.optimizer = torch.optim.AdamW(reference.model.parameters(), **{kernel: True})
    reference.scheduler = None
    reference.backward()
    return reference.update


def benchmark_alone(model_name, device, repeats, sparsities=(0.5, 0.7, 0.9), batch_size=None,
                    context=None, amp="none"):
    """benchmark()'s rows for a model too large to hold all its rigs at once (GPT-2 124M): one rig alive
    at a time, AdamWPrune at each of `sparsities`, the baselines at the middle one. Each rig: step 1 prunes
    to 61% of the target (cubic); step 2's update, on step 1's gradients, prunes to the target, timed once;
    step 3, a steady step, is the tracked peak; its gradients are then stepped `repeats` times, interleaved
    with torch's fused AdamW on the same tensors. The mask update is step 2's update less a steady one. A
    rig that does not fit in memory is a row saying so. Yields each row when it is measured (under a minute
    on a CPU)."""
    middle = sparsities[len(sparsities) // 2]
    phases = [(optimizer, pruning, target) for optimizer, pruning in pairings()
              for target in ((0.0,) if pruning == "none" else sparsities if optimizer == "adamwprune" else (middle,))]
    for optimizer, pruning, target in phases:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {"model": model_name, "optimizer": optimizer, "pruning": pruning,
               "phase": "before" if pruning == "none" else "pruned"}
        rig = None
        try:
            rig = Rig(model_name, optimizer, pruning, target, device, prune_end=2, batch_size=batch_size,
                      context=context, amp=amp)
            rig.train_step()  # step 2 steps step 1's gradients again: a backward pass less per rig
            pruning_update = median_seconds({"update": rig.update}, repeats=1, warmup=0)["update"]
            row.update(memory_figures(rig))  # its peak: step 3
            fused = torch.optim.AdamW(rig.model.parameters(), fused=True)  # the reference, on the rig's tensors
            seconds = median_seconds({"fused": lambda: rig.train_update(rig.config, rig.model, fused, None, None),
                                      "update": rig.update}, repeats, warmup=1)  # each as train.py steps (clipped)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in str(error):
                raise
            yield {**row, "error": f"does not fit in {device.type} memory ({str(error).splitlines()[0]})"}
            continue
        finally:
            del rig  # one rig at a time
        row.update(update_seconds=seconds["update"], vs_fused=seconds["update"] / seconds["fused"], vs_foreach=None)
        if pruning != "none":
            row["mask_update_fused_steps"] = (pruning_update - seconds["update"]) / seconds["fused"]
        yield row


def peak_summary(rows, sparsity=0.7):
    """One line of a model's rows: the optimizer state's share of AdamW's step peak, and what AdamWPrune at
    `sparsity` takes off the peak against AdamW and against AdamW + movement."""
    by = {(r["optimizer"], r["pruning"], round(r.get("sparsity", -1), 2)): r for r in rows if "error" not in r}
    adamw, movement = by.get(("adamw", "none", 0.0)), by.get(("adamw", "movement", sparsity))
    ours = by.get(("adamwprune", "state", sparsity))
    if not (adamw and movement and ours):
        return f"{rows[0]['model']}: no summary (a row at {sparsity:.0%} is missing)"
    off = lambda other: 1 - ours["peak_step_bytes"] / other["peak_step_bytes"]  # noqa: E731
    return (f"{rows[0]['model']}: AdamW's state is {adamw['optimizer_state_bytes'] / adamw['peak_step_bytes']:.1%} "
            f"of its step's peak; AdamWPrune at {sparsity:.0%}: peak {off(adamw):.1%} below AdamW's, "
            f"{off(movement):.1%} below AdamW + movement's")


def mask_update_fused_steps(model_name, optimizer, pruning, sparsity, device, repeats, fused_update):
    """What a late mask update (61% to `sparsity`, on pruned and compacted state) adds to the update
    after backward, in fused AdamW steps timed beside it. Each round a copy of one rig at 61% takes
    the update that prunes to `sparsity`, then a steady one on the same gradients, and fused_update()
    runs once; the median over the rounds (one more first, to warm up) of the difference / fused step."""
    rig = Rig(model_name, optimizer, pruning, sparsity, device, prune_end=2)
    rig.train_step()  # step 1: 61%
    rig.backward()  # the gradients of every copy's steps 2 and 3
    once = lambda action: median_seconds({"once": action}, repeats=1, warmup=0)["once"]  # noqa: E731
    ratios = []
    for _ in range(1 + repeats):
        twin = copy.deepcopy(rig)  # model, optimizer and pruning state together
        pruning_update = once(twin.update)  # step 2: prunes to `sparsity`
        steady_update = once(twin.update)  # step 3
        ratios.append((pruning_update - steady_update) / once(fused_update))
    return statistics.median(ratios[1:])


def sharded_state_bytes(model_name, device, sparsity=0.7):
    """Run by torchrun: the model sharded by FSDP2 over every rank and AdamWPrune pruned to
    `sparsity`. Returns (optimizer state bytes on each rank, one process's, prunable weights)."""
    import train
    one_process = Rig(model_name, "adamwprune", "state", sparsity, device)
    sharded = Rig(model_name, "adamwprune", "state", sparsity, device,  # sharded as train.py --fsdp shards it
                  wrap=lambda model: train.wrapped(model, {"model": model_name, "device": str(device), "fsdp": True}))
    for rig in (one_process, sharded):
        for _ in range(2):  # prune at step 1, settle
            rig.train_step()
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, optimizer_state_bytes(sharded.optimizer))
    return per_rank, optimizer_state_bytes(one_process.optimizer), sum(p.numel() for p in one_process.prunable)


# --- the pruned model: its file, and inference with sparse tensors ---


def saved_bytes(obj):
    """Bytes of `obj` as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def pruned_model_report(model_name, repeats, sparsity=0.7):
    """Lines on a model pruned to `sparsity` by AdamWPrune: its compact file against the dense
    state_dict, fp32 and bf16 values; and, for LeNet-5's linear layers, one batch through dense
    weights with zeros against torch.sparse CSR matrices."""
    from adamwprune import compact_state_dict
    rig = Rig(model_name, "adamwprune", "state", sparsity, "cpu")
    rig.train_step()  # prunes to `sparsity` at step 1
    dense_bytes = saved_bytes(rig.model.state_dict())
    lines = [f"{model_name}: dense state_dict {format_bytes(dense_bytes)}; compact file: " + ", ".join(
        f"{name} values {format_bytes(b)} ({b / dense_bytes:.3f}x)" for name, b in
        (("fp32", saved_bytes(compact_state_dict(rig.model))),
         ("bf16", saved_bytes(compact_state_dict(rig.model, values_dtype=torch.bfloat16)))))]
    linears = [m for m in rig.model.modules() if isinstance(m, torch.nn.Linear)]
    if model_name == "lenet5":
        x = torch.randn(BATCH_SIZE[model_name], linears[0].in_features)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            csr = [m.weight.detach().to_sparse_csr() for m in linears]

        def run(weights):
            h = x
            for m, w in zip(linears, weights):
                h = (torch.sparse.mm(w, h.t()).t() if w.layout == torch.sparse_csr else h @ w.t()) + m.bias
            return h
        with torch.no_grad():
            seconds = median_seconds({"dense": lambda: run([m.weight for m in linears]), "csr": lambda: run(csr)},
                                     repeats)
        lines.append(f"{model_name} linear layers, batch {len(x)}: dense with zeros {seconds['dense'] * 1e3:.3f} ms, "
                     f"CSR {seconds['csr'] * 1e3:.3f} ms ({seconds['csr'] / seconds['dense']:.2f}x)")
    return lines


# --- the data path: train.py's training loop against the bare loop ---


def measure_data_path(flags, steps=100, repeats=3):
    """Seconds per step of train.py's training loop against the bare forward/backward/update loop
    over batches already in memory as float tensors (the aim is a ratio of at most 1.1),
    for the run that train.py's `flags` describe: {"train_step_seconds", "bare_step_seconds",
    "ratio"}, the fastest of `repeats` alternations of `steps` steps each."""
    import train
    config = train.parse_args(flags, writes=False)
    total_steps = config["epochs"] * train.steps_per_epoch(config)
    sample_every = max(1, total_steps // train.TIMELINE_SAMPLES)  # memory samples as often as in the run
    config = {**config, "limit": steps * config["batch_size"], "epochs": 1}
    state, train_data, _ = train.setup(config)
    state.monitor.every = sample_every
    batches = list(train_data.batches(config["batch_size"], torch.Generator().manual_seed(0)))

    def bare_pass():
        for x, y in batches:
            with train.autocast(config):
                loss = torch.nn.functional.cross_entropy(state.model(x).flatten(0, -2), y.flatten())
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            train.update(config, state.model, state.optimizer, state.scheduler, state.pruning)
        loss.item()  # wait for the device

    def seconds(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    bare_pass()  # warm up
    bare, full = [], []
    for _ in range(repeats):
        bare.append(seconds(bare_pass))
        full.append(seconds(lambda: train.train_epoch(state, train_data, 1, show_progress=False)))
    return {"train_step_seconds": min(full) / steps, "bare_step_seconds": min(bare) / steps,
            "ratio": min(full) / min(bare)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Memory and update time of every optimizer/pruning pairing, against torch's AdamW")
    parser.add_argument("--model", choices=["lenet5", "resnet18", "gpt-tiny", "gpt2", "all"], default="all",
                        help="which model; gpt-tiny, gpt2: models.GPT's shapes on random tokens (12 x 64; GPT-2 "
                        "124M at 1 x 1024, its rigs one at a time) (default: all: lenet5 and resnet18)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="a GPT's sequences per step "
                        f"(default: {BATCH_SIZE['gpt-tiny']} for gpt-tiny, {BATCH_SIZE['gpt2']} for gpt2)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="gpt2 on CUDA: bf16 autocast, as train.py --amp bf16 (default: none)")
    parser.add_argument("--context", type=int, metavar="T",
                        help="a GPT's tokens per sequence, at most its block size (default: the block size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", metavar="DEV",
                        help="device (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=20, metavar="N",
                        help="timed updates per row; medians are reported (default: 20)")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: AdamWPrune's state on each "
                        "rank with the model sharded by FSDP2, at 70%% sparsity (default: off)")
    parser.add_argument("--pruned-model", action="store_true", help="the compact file of a 70%%-sparse model "
                        "against the dense state_dict, and inference with CSR weights (default: off)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    from models import GPT_SHAPES
    block = GPT_SHAPES.get(args.model, {}).get("block_size")
    if (args.batch_size or args.context) and not block:
        parser.error("--batch-size and --context shape a GPT's batch: use --model gpt-tiny or gpt2")
    if args.amp == "bf16" and (args.model != "gpt2" or not args.device.startswith("cuda")):
        parser.error("--amp bf16 is for --model gpt2 on CUDA (--device cuda)")
    too_small = args.batch_size is not None and args.batch_size < 1
    if too_small or args.context is not None and not 1 <= args.context <= block:
        parser.error(f"--batch-size takes a whole number of at least 1, --context one from 1 to {block}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the benchmark measures cpu or cuda only")
    models = ["lenet5", "resnet18"] if args.model == "all" else [args.model]
    if args.pruned_model:
        for model_name in models:
            print("\n".join(pruned_model_report(model_name, args.repeats)))
        return
    if args.fsdp:
        if "WORLD_SIZE" not in os.environ:
            parser.error("--fsdp runs under torchrun: torchrun --standalone --nproc_per_node 2 memory.py --fsdp")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        for model_name in models:
            per_rank, one_process, prunable = sharded_state_bytes(model_name, device)
            if int(os.environ["RANK"]) == 0:
                print(f"{model_name}: AdamWPrune at 70% sparsity, optimizer state {format_bytes(one_process)} in one "
                      f"process ({one_process / prunable:.2f} B per prunable weight); FSDP2 over {len(per_rank)} "
                      "ranks: " + ", ".join(f"rank {r} {format_bytes(b)} ({b / one_process:.0%})"
                                            for r, b in enumerate(per_rank)), flush=True)
        torch.distributed.barrier()  # every rank done with the group before any tears it down
        torch.distributed.destroy_process_group()
        return
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}. Bytes per prunable weight; peak: one training step "
          f"(batch {BATCH_SIZE['lenet5']} for lenet5, {BATCH_SIZE['resnet18']} for resnet18, "
          f"{args.batch_size or BATCH_SIZE['gpt-tiny']} x {args.context or 64} tokens for gpt-tiny, "
          f"{args.batch_size or BATCH_SIZE['gpt2']} x {args.context or 1024} for gpt2); update: "
          f"optimizer + pruning work after backward, median of {args.repeats}, against torch's AdamW "
          "(fused=True, and foreach=True) on the same gradients; mask update: the time one adds, in fused steps; "
          "reserved: on CUDA, the allocator's max_memory_reserved in that step, the rig alone on the device, its "
          "input batch and cuBLAS's workspace included (left out of peak)")
    header = (f"{'model':<9} {'optimizer + pruning':<22} {'phase':<7} {'sparsity':>8} {'state B':>8} "
              f"{'pruning B':>9} {'peak MiB':>9} {'reserved':>9} {'update ms':>10} {'vs fused':>9} {'vs foreach':>10} "
              f"{'mask update':>11}")
    print(header)
    print("-" * len(header))
    summaries = []
    for model_name in models:
        rows = []
        for r in (benchmark_alone(model_name, device, args.repeats, batch_size=args.batch_size,
                                  context=args.context, amp=args.amp)
                  if model_name in ONE_AT_A_TIME else benchmark(model_name, device, args.repeats)):
            rows.append(r)
            name = f"{r['model']:<9} {r['optimizer'] + ' + ' + r['pruning']:<22} {r['phase']:<7}"
            if "error" in r:
                print(f"{name} {r['error']}", flush=True)
                continue
            mask_update = f"{r['mask_update_fused_steps']:>10.1f}x" if "mask_update_fused_steps" in r else ""
            reserved = f"{r['peak_reserved_bytes'] / 2**20:.2f}" if r["peak_reserved_bytes"] is not None else "-"
            foreach = f"{r['vs_foreach']:>9.2f}x" if r["vs_foreach"] else f"{'-':>10}"  # gpt2: fused only
            print(f"{name} {r['sparsity']:>8.1%} {r['state_bytes_per_prunable']:>8.2f} "
                  f"{r['pruning_bytes_per_prunable']:>9.2f} {r['peak_step_bytes'] / 2**20:>9.2f} {reserved:>9} "
                  f"{r['update_seconds'] * 1e3:>10.3f} {r['vs_fused']:>8.2f}x {foreach} {mask_update:>11}", flush=True)
        summaries.append(peak_summary(rows))
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
