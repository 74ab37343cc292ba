"""
Memory measurement for training runs, on CUDA and on the CPU, and the memory/speed benchmark.

    $ python memory.py                 # optimizer step time and state bytes, AdamWPrune vs AdamW

What is measured, and how:
- persistent training state, by category (parameters, gradients, optimizer state, pruning
  buffers, model buffers), counted exactly by walking the tensors; a storage shared by several
  tensors (views, tied weights) is counted once. Works on any device.
- on CUDA, the caching allocator's own figures: `memory_allocated`, `memory_reserved` and the
  run's `max_memory_allocated` (reset at the start of the run).
"""
import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# --- accounting of persistent state ---


def tensor_bytes(tensors, seen=None):
    """Bytes of the storages behind `tensors`, each storage counted once (views share one)."""
    seen = set() if seen is None else seen
    total_bytes = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total_bytes += storage.nbytes()
    return total_bytes


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
    block are not counted: this measures what the region itself allocates (activations,
    gradients, temporaries). Works on the CPU, where torch keeps no allocator statistics.

        with TensorMemoryTracker() as tracker:
            loss = model(x).sum(); loss.backward()
        tracker.peak_bytes
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storage_refs = {}  # id(storage) -> weak reference, while the storage is alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
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


# --- a run's memory timeline ---


class MemoryMonitor:
    """Samples training memory every few steps; `report()` gives the peak, mean and timeline.

    On CUDA the figures are the allocator's (allocated and reserved bytes, and the run's
    `max_memory_allocated` as the peak). On the CPU they are the persistent training state
    counted by `training_state_bytes` (activations are not included there).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.timeline = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self, step, model, optimizer, pruning_buffers=()):
        if self.device.type == "cuda":
            allocated_bytes = torch.cuda.memory_allocated(self.device)
            reserved_bytes = torch.cuda.memory_reserved(self.device)
        else:
            allocated_bytes = training_state_bytes(model, optimizer, pruning_buffers)["total"]
            reserved_bytes = allocated_bytes
        self.timeline.append(
            {"step": step, "allocated_bytes": allocated_bytes, "reserved_bytes": reserved_bytes}
        )

    def report(self):
        allocated = [s["allocated_bytes"] for s in self.timeline] or [0]
        if self.device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(self.device)
            source = "cuda allocator (max_memory_allocated)"
        else:
            peak_bytes = max(allocated)
            source = "persistent training state (parameters, gradients, optimizer, pruning buffers)"
        return {
            "device": str(self.device),
            "source": source,
            "peak_bytes": peak_bytes,
            "mean_bytes": statistics.fmean(allocated),
            "timeline": self.timeline,
        }


# --- the benchmark: optimizer step time and state bytes ---


def _with_random_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
    return model


def _median_step_seconds(optimizers, repeats, warmup=3):
    """Median seconds per step() of each optimizer, stepping them in a random order every round
    so that drift in machine load falls on all of them alike."""
    import random
    rng = random.Random(0)
    seconds = {name: [] for name in optimizers}
    for round_index in range(warmup + repeats):
        for name in rng.sample(list(optimizers), len(optimizers)):
            opt = optimizers[name]
            device = opt.param_groups[0]["params"][0].device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def optimizer_step_benchmark(model_name, device, repeats):
    """Rows of (name, seconds per step, ratio to AdamW, state bytes per prunable element)."""
    from adamwprune import AdamWPrune
    from models import build_model
    in_channels, image_size = (1, 28) if model_name == "lenet5" else (3, 32)

    def fresh():
        torch.manual_seed(0)
        return _with_random_grads(build_model(model_name, in_channels, 10, image_size).to(device))

    models = {name: fresh() for name in ("adamw", "adamwprune, before pruning", "adamwprune, 70% sparse")}
    optimizers = {
        "adamw": torch.optim.AdamW(models["adamw"].parameters(), foreach=True),
        "adamwprune, before pruning": AdamWPrune(models["adamwprune, before pruning"].parameters(),
                                                 sparsity=0.7, prune_start=10**9, prune_end=10**9),
        "adamwprune, 70% sparse": AdamWPrune(models["adamwprune, 70% sparse"].parameters(),
                                             sparsity=0.7, prune_start=1, prune_end=1),
    }
    seconds = _median_step_seconds(optimizers, repeats)
    rows = []
    for name, opt in optimizers.items():
        prunable = [p for p in models[name].parameters() if p.dim() >= 2]
        per_element = optimizer_state_bytes(opt, prunable) / sum(p.numel() for p in prunable)
        rows.append((name, seconds[name], seconds[name] / seconds["adamw"], per_element))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Optimizer step time and state memory: AdamWPrune vs AdamW")
    parser.add_argument("--model", choices=["lenet5", "resnet18", "all"], default="all",
                        help="which model's parameters to step (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", metavar="DEV",
                        help="device (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=30, metavar="N",
                        help="timed steps per optimizer; medians are reported (default: 30)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; median of {args.repeats} steps, optimizers stepped in random order")
    print(f"{'model':<9} {'optimizer':<28} {'step ms':>9} {'vs AdamW':>9} {'state B/prunable':>17}")
    for model_name in (["lenet5", "resnet18"] if args.model == "all" else [args.model]):
        for opt_name, seconds, ratio, per_element in optimizer_step_benchmark(model_name, device, args.repeats):
            print(f"{model_name:<9} {opt_name:<28} {seconds * 1e3:>9.3f} {ratio:>8.2f}x {per_element:>17.2f}")


if __name__ == "__main__":
    main()
