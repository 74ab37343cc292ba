"""
Plots of a comparison from its saved results: hand-written SVG and terminal text, standard library only.

    $ python train.py --compare --out results/compare      # the runs: writes comparison.json and results.json
    $ python plot.py results/compare                       # SVGs into results/compare, text plots to stdout
    $ python plot.py results/compare --plot text --ascii   # text only, pure ASCII
    $ python plot.py results/compare --plot svg            # SVGs only

The SVGs: comparison.svg (six panels), memory_timeline.svg, memory_vs_accuracy.svg and, when several
sparsities were swept, accuracy_vs_sparsity.svg. A sweep's other figures show the dense rows and the
rows at the highest sparsity; the text plots show every row. A row whose results.json is missing keeps
its bars (their numbers are in comparison.json) and loses its curves, with a note. A damaged file
(not JSON, or lacking keys) stops plot.py with one line: the file, what is wrong, what to do.

comparison.json and .csv are written here as well as read (write_comparison, called by train.py
--compare), so their format lives in one file; write_atomic writes every result file of the project.
"""
import argparse
import contextlib
import csv
import fcntl
import html
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap

# --- config ---
COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")  # Okabe-Ito
DASHES = ("", "10 4", "3 3", "10 3 3 3", "18 5", "6 6", "10 3 3 3 3 3", "2 6")  # stroke-dasharray, per method
MARKERS = (  # (vertices, rotation in degrees, inner radius as a fraction: stars), per method
    (24, 0, 1), (4, 45, 1), (4, 0, 1), (3, -90, 1), (3, 90, 1), (5, -90, 1), (6, 0, 1), (10, -90, 0.45))
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
FONT_PX, PANEL_PX, TITLE_PX = 14, 16, 22  # ticks, labels and legends; panel titles; figure titles
CHAR_WIDTH = 0.64  # mean glyph width per pixel of font size (DejaVu Sans): lays text out without a renderer
INK, GRID, MUTED = "#222222", "#e2e2e2", "#555555"
LINE_WIDTH = 2.4
MIB = 2 ** 20
MODELS = {"lenet5": "LeNet-5", "resnet18": "ResNet-18", "gpt": "GPT (gpt-tiny)"}
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "shakespeare": "Tiny Shakespeare"}
CURVES = {  # name: (panel title, x label, y label, y axis from zero); "metric": the run's, as its metric says
    "metric": ("Test accuracy", "epoch", "test accuracy (%)", False),
    "loss": ("Training loss", "epoch", "training loss (cross-entropy)", False),
    "sparsity": ("Sparsity of the prunable weights", "optimizer step", "sparsity (%)", True),
    "memory": ("Allocated memory", "optimizer step", "allocated memory (MiB)", True),
}
TEXT_COLUMNS, LABEL_COLUMNS, SPARK_COLUMNS, BAR_COLUMNS = 100, 30, 50, 50  # text plots: widths in columns
SPARKS = {False: "▁▂▃▄▅▆▇█", True: "_.-:=+*#"}  # keyed by ascii
EIGHTHS = "▏▎▍▌▋▊▉"
HOW_TO_MAKE = "make it with `python train.py --compare --out {}`"
ROW_KEYS = ("name", "sparsity", "results_dir", "METRIC", "peak_memory_mib")  # in comparison.json; + efficiency
RESULTS_KEYS = (  # what train.py --compare and the plots read of a row's results.json ("final.sparsity": in "final")
    "config", "environment", "history", "sparsity_timeline", "memory.mean_bytes", "memory.timeline",
    "final.METRIC", "final.sparsity", "final.peak_memory_bytes", "final.wall_seconds")  # METRIC: metric.key's
ACCURACY = {"key": "test_accuracy", "label": "test accuracy (%)", "higher_is_better": True}  # the image models'


# --- data ---
class PlotInputError(Exception):
    """A result file that is missing or damaged; the message names it, says what is wrong and what to do."""


def write_atomic(path, write, binary=False):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: a crash
    leaves the old file or the new one, never half of one. The temporary file is named after `path`
    (results.json.x1y2z3.tmp); readers never open it, and those a crash left are removed by the next write.
    A write that fails (a full disk, a folder that cannot be written) removes its temporary file and
    raises WriteError, naming the file and the operating system's reason."""
    directory, name = os.path.split(path)
    directory, temporary = directory or ".", None
    try:
        with tempfile.NamedTemporaryFile("wb" if binary else "w", encoding=None if binary else "utf-8",
                                         dir=directory, prefix=name + ".", suffix=".tmp", delete=False) as f:
            temporary = f.name
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(f.name, 0o644)  # tempfile makes files private; results are for reading
        os.replace(f.name, path)
    except BaseException as error:
        reason = error  # torch.save reports a failed write as a RuntimeError, the OSError underneath
        while reason is not None and not isinstance(reason, OSError):
            reason = reason.__cause__ or reason.__context__
        if temporary and (reason is not None or isinstance(error, KeyboardInterrupt)):  # a failed or stopped
            with contextlib.suppress(OSError):  # write leaves nothing behind (a crash: the next write cleans up)
                os.remove(temporary)
        if reason is None:
            raise
        raise WriteError(f"cannot write {path}: {(reason.strerror or str(reason)).lower()}") from error
    for left in os.listdir(directory):  # only this file's: under torchrun other ranks write theirs meanwhile
        if left.startswith(name + ".") and left.endswith(".tmp"):
            os.remove(os.path.join(directory, left))


class WriteError(Exception):
    """A result file that could not be written; the file that was there is untouched."""


@contextlib.contextmanager
def claimed(out):
    """While inside: the folder `out` exists, files can be written in it, and this process holds an OS
    lock on it (one run per folder; a killed run's lock goes with it). A folder made here and still
    empty at the end is removed again."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
        lock = os.open(out, os.O_RDONLY)
    except OSError as error:
        raise FolderError(f"cannot write in --out {out}: {(error.strerror or str(error)).lower()}; "
                          "pass another --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        inode, holder = f":{os.stat(out).st_ino} ", "another process"
        with contextlib.suppress(OSError):  # Linux names it in /proc/locks: "1: FLOCK ... PID 08:01:INODE ..."
            holder = next((f"process {line.split()[4]}" for line in open("/proc/locks")
                           if " FLOCK " in line and inode in line), holder)
        raise FolderError(f"{out} is in use by another run ({holder}): wait for it to end, or pass another "
                          "--out") from None
    try:
        yield
    finally:
        os.close(lock)
        if made:
            with contextlib.suppress(OSError):  # rmdir removes only an empty folder
                os.rmdir(out)


class FolderError(Exception):
    """A results folder that cannot be written, or that another run is using."""


def finite_json(results):
    """`results` as JSON text, null where a number is nan or infinite (which JSON cannot hold)."""
    return json.dumps(json.loads(json.dumps(results), parse_constant=lambda _: None), indent=1)


def metric_of(data):
    """What a results.json or comparison.json is judged by: {key, label, higher_is_better}; older files,
    written before the GPT, were all in test accuracy."""
    return data.get("metric") or ACCURACY


def keys_of(keys, metric):
    """The keys with METRIC spelled as the metric's own key."""
    return [key.replace("METRIC", metric["key"]) for key in keys]


def title_of(metric):
    return metric["label"].split(" (")[0].capitalize()  # "Validation loss"


def noun_of(metric):
    return "accuracy" if metric["key"] == "test_accuracy" else title_of(metric).lower()  # in figure titles


def comparison_row(name, config, results, results_dir):
    """A row of comparison.json: one run's config and results.json, with paths relative to results_dir.
    efficiency (the metric per 100 MiB of peak memory) only where higher is better: accuracy."""
    final, memory_report, metric = results["final"], results["memory"], metric_of(results)
    value = final[metric["key"]]
    peak_mib, reserved_bytes = final["peak_memory_bytes"] / MIB, final.get("peak_reserved_bytes")
    return {"name": name, "optimizer": config["optimizer"], "pruning": config["pruning"],
            "importance": config["importance"] if config["pruning"] == "state" else None,
            "sparsity": config["sparsity"], "results_dir": os.path.relpath(config["out"], results_dir),
            metric["key"]: value, "peak_memory_mib": peak_mib,
            "peak_reserved_mib": reserved_bytes / MIB if reserved_bytes else None,  # CUDA's max_memory_reserved
            "mean_memory_mib": memory_report["mean_bytes"] / MIB,
            "efficiency": value / peak_mib * 100 if metric["higher_is_better"] else None,
            "sparsity_reached": final["sparsity"], "wall_seconds": final["wall_seconds"],
            "file_vs_dense": final["pruned_file_bytes"] / final["dense_file_bytes"] if "pruned_file_bytes" in final else None}


def write_comparison(results_dir, config, rows, environment, metric=ACCURACY):
    """comparison.json (the comparison's config, environment, metric and rows) and comparison.csv (the rows)."""
    comparison = {"model": config["model"], "dataset": config["dataset"], "epochs": config["epochs"],
                  "seed": config["seed"], "sparsities": config["sparsities"], "environment": environment,
                  "metric": metric, "rows": rows}
    write_atomic(os.path.join(results_dir, "comparison.json"), lambda f: f.write(finite_json(comparison)))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(os.path.join(results_dir, "comparison.csv"), write_csv)


def lookup(data, key):
    """data["final"]["sparsity"] for the key "final.sparsity"; None where a part is missing."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def read_json(path, keys, fix):
    """The JSON object in `path`, holding each of `keys` (METRIC in a key: its metric's key); otherwise
    PlotInputError: the file, what is wrong, `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:  # ValueError: not JSON (cut short, overwritten), or not UTF-8
        raise PlotInputError(f"{path} cannot be read as JSON ({error}): {fix}") from None
    keys = keys_of(keys, metric_of(data) if isinstance(data, dict) else ACCURACY)
    missing = [key for key in keys if lookup(data, key) is None]
    if missing:
        raise PlotInputError(f"{path} lacks {', '.join(missing)}: {fix}")
    return data


def read_results(path):
    """A row's results.json, holding what a comparison reads of it; None where there is no such file."""
    fix = f"delete that row's folder {os.path.dirname(path)} and rerun the comparison"
    return read_json(path, RESULTS_KEYS, fix) if os.path.exists(path) else None


def load_comparison(results_dir):
    """(comparison.json, {row label: that row's results.json}); rows without results.json are left out,
    a damaged file stops with PlotInputError.

    Each row gets a "label": its name, plus " @ 70%" where a sweep repeats the name."""
    path, remake = os.path.join(results_dir, "comparison.json"), "re" + HOW_TO_MAKE.format(results_dir)
    if not os.path.isdir(results_dir):
        raise PlotInputError(f"no directory {results_dir}: {HOW_TO_MAKE.format(results_dir)}")
    if not os.path.isfile(path):
        raise PlotInputError(f"{results_dir} has no comparison.json: {HOW_TO_MAKE.format(results_dir)}")
    comparison = read_json(path, ("rows",), remake)
    rows, metric = comparison["rows"], metric_of(comparison)
    keys = keys_of(ROW_KEYS, metric) + ["efficiency"] * metric["higher_is_better"]
    try:
        lacking = next((f"row {i} has no usable {key!r}" for i, row in enumerate(rows) for key in keys
                        if row.get(key) is None or row[key] in (math.inf, -math.inf) or row[key] != row[key]),
                       None if rows else "it lists no rows")  # x != x: NaN
    except (TypeError, AttributeError):
        lacking = "its rows are not a list of objects"
    if lacking:
        raise PlotInputError(f"{path} will not plot: {lacking}; {remake}")
    names, results = [row["name"] for row in rows], {}
    for row in rows:
        row["label"] = row["name"] + (f" @ {percent(row['sparsity'])}" if names.count(row["name"]) > 1 else "")
        found = read_results(os.path.join(results_dir, row["results_dir"], "results.json"))
        if found:  # a row without results.json keeps its bars and loses its curves
            results[row["label"]] = found
    return comparison, results


def missing_note(rows, results):
    missing = [row["label"] for row in rows if row["label"] not in results]
    return f"note: no readable results.json for {', '.join(missing)}: curves left out" if missing else ""


def curve(results, name):
    """[(x, y)] of one run: its metric or training loss per epoch, sparsity (%) or memory (MiB) per step; [] if absent."""
    try:
        if name in ("metric", "loss"):
            key = metric_of(results)["key"] if name == "metric" else "train_loss"
            points = [(h["epoch"], h[key]) for h in results.get("history", [])]
        elif name == "sparsity":
            points = [(s["step"], 100 * s["sparsity"]) for s in results.get("sparsity_timeline", [])]
        else:
            points = [(s["step"], s["allocated_bytes"] / MIB) for s in results.get("memory", {}).get("timeline", [])]
        return [(x, y) for x, y in points if math.isfinite(y)]
    except (KeyError, TypeError, AttributeError):  # a results.json of another shape: no curve, not a crash
        return []


def clip(text, width=LABEL_COLUMNS):
    return text if len(text) <= width else text[:width - 3] + "..."


def percent(fraction):
    return f"{100 * fraction:g}%"


def sparsities(rows):
    return sorted({row["sparsity"] for row in rows if row["sparsity"] > 0})


def focus(rows):
    """The rows most figures show: all, or for a sweep the dense rows and those at the highest sparsity.

    Either way no name repeats, so the figures name rows by name."""
    swept = sparsities(rows)
    return [row for row in rows if row["sparsity"] in (0, swept[-1])] if len(swept) > 1 else rows


def describe(comparison, rows):
    """'LeNet-5 on Fashion-MNIST, 70% sparsity' for these rows."""
    model, dataset = comparison.get("model", "?"), comparison.get("dataset", "?")
    swept = [percent(s) for s in sparsities(rows)]
    amount = f"{swept[0]} to {swept[-1]} sparsity" if len(swept) > 1 else f"{swept[0]} sparsity" if swept else "dense"
    return f"{MODELS.get(model, model)} on {DATASETS.get(dataset, dataset)}, {amount}"


def provenance(comparison):
    environment = comparison.get("environment", {})
    return (f"{comparison.get('epochs', '?')} epochs, seed {comparison.get('seed', '?')}; "
            f"torch {environment.get('torch', '?')} on {environment.get('device', '?')}")


def bar_start(values, metric=ACCURACY):
    """Where the metric's bars start: below the lowest by half the spread (at least a point of accuracy, 1%
    of a loss), not below 0."""
    least = 1.0 if metric["key"] == "test_accuracy" else 0.01 * min(values)
    return max(0.0, min(values) - max(least, (max(values) - min(values)) / 2))


def curves_of(metric):
    """CURVES, the first titled by the metric."""
    return {**CURVES, "metric": (title_of(metric), "epoch", metric["label"], False)}


def last_panel(rows, metric):
    """(values, axis label, title, text title) of a comparison's last bars: efficiency where higher is
    better, else wall time."""
    if metric["higher_is_better"]:
        return ([row["efficiency"] for row in rows], "% accuracy per 100 MiB", "Efficiency",
                "efficiency (% accuracy per 100 MiB)")
    return [row.get("wall_seconds") or 0.0 for row in rows], "wall time (s)", "Wall time", "wall time (s)"


def numbers(values, digits=4):
    """The values with the decimals that give the largest `digits` significant digits: 87.34, 1.450, 9136."""
    largest = max((abs(v) for v in values if math.isfinite(v) and v), default=1)
    return [f"{v:.{max(0, digits - 1 - math.floor(math.log10(largest)))}f}" if v else "0" for v in values]


def number(value, digits=3):
    return numbers([value], digits)[0]


# --- scales ---
def nice_ticks(low, high, count=5):
    """Round ticks (steps of 1, 2, 2.5 or 5 times a power of ten) from at or below low to at or above high."""
    if high - low < 1e-12:
        low, high = (low - (abs(low) * 0.1 or 1), high + (abs(high) * 0.1 or 1)) if low else (0.0, 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def axis(low, high, tight=False):
    """(low, high, ticks): the range runs to round ticks, or when tight is exactly [low, high]."""
    ticks = nice_ticks(low, high)
    if not tight or high - low < 1e-12:
        return ticks[0], ticks[-1], ticks
    return low, high, [t for t in ticks if low - 1e-9 <= t <= high + 1e-9]


def tick_labels(ticks):
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    decimals = next(d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6 * 10 ** d)
    return [f"{t:.{decimals}f}" for t in ticks]


def text_width(text, size=FONT_PX):
    return len(text) * size * CHAR_WIDTH


# --- svg ---
def esc(value):
    return html.escape(str(value), quote=True)


class Svg:
    """An SVG document built element by element; every text and attribute is escaped on the way in."""

    def __init__(self, width, title):
        self.width = width
        self.parts = [f"<title>{esc(title)}</title>"]

    def add(self, tag, content=None, **attrs):
        """One element; '_' in attribute names becomes '-' (stroke_width), a trailing one is dropped (class_)."""
        text = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(round(v, 1) if isinstance(v, float) else v)}"'
                       for k, v in attrs.items() if v not in (None, ""))
        self.parts.append(f"<{tag}{text}/>" if content is None else f"<{tag}{text}>{esc(content)}</{tag}>")

    def text(self, x, y, content, size=FONT_PX, anchor="start", **attrs):
        self.add("text", content, x=x, y=y, font_size=size, text_anchor=anchor, **attrs)

    def save(self, path, height):
        """Write the document to `path` atomically: a temporary file beside it, then a rename."""
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{height:.0f}" '
                f'viewBox="0 0 {self.width} {height:.0f}" font-family="{FONT}" fill="{INK}">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n')
        write_atomic(path, lambda f: f.write(head + "\n".join(self.parts) + "\n</svg>\n"))


def marker(svg, style, x, y, radius=6.0):
    vertices, rotation, inner = style["marker"]
    angles = [math.radians(rotation + 360 * i / vertices) for i in range(vertices)]
    points = [(x + radius * (inner if i % 2 else 1) * math.cos(a), y + radius * (inner if i % 2 else 1) * math.sin(a))
              for i, a in enumerate(angles)]
    svg.add("polygon", points=" ".join(f"{px:.1f},{py:.1f}" for px, py in points),
            fill=style["colour"], stroke=INK, stroke_width=1)


def legend(svg, left, top, width, entries, swatch="line"):
    """(label, style) entries in as many equal columns as fit in `width`, centred; returns the height used.

    The swatch is the series' "line", its "marker", or "both"."""
    column = 84 + max(text_width(label) for label, _ in entries)
    columns = max(1, min(len(entries), int(width // column)))
    left += (width - columns * column) / 2
    for i, (label, style) in enumerate(entries):
        x, y = left + column * (i % columns), top + 13 + 26 * (i // columns)
        if swatch != "marker":
            svg.add("line", x1=x, x2=x + 44, y1=y, y2=y, stroke=style["colour"], stroke_width=LINE_WIDTH + 0.6,
                    stroke_dasharray=style["dash"])
        if swatch != "line":
            marker(svg, style, x + (22 if swatch == "both" else 36), y)
        svg.text(x + 52, y + 5, label)
    return 26 * math.ceil(len(entries) / columns)


def axes(svg, box, x_axis, y_axis, xlabel, ylabel, title):
    """Grid, ticks, frame and labels around box = (left, top, width, height); returns (to_x, to_y).

    An axis is (low, high, ticks); y_axis None leaves the y axis bare (bar charts label their rows)."""
    left, top, width, height = box
    (x_low, x_high, x_ticks), (y_low, y_high, y_ticks) = x_axis, y_axis or (0, 1, [])

    def to_x(value):
        return left + (value - x_low) / (x_high - x_low) * width

    def to_y(value):
        return top + height - (value - y_low) / (y_high - y_low) * height

    x_labels = tick_labels(x_ticks)
    spacing = to_x(x_ticks[1]) - to_x(x_ticks[0]) if len(x_ticks) > 1 else width
    every = math.ceil((text_width(max(x_labels, key=len)) + 14) / spacing)  # label fewer ticks when crowded
    for i, (value, label) in enumerate(zip(x_ticks, x_labels)):
        svg.add("line", x1=to_x(value), x2=to_x(value), y1=top, y2=top + height + 6, stroke=GRID)
        if i % every == 0:
            svg.text(to_x(value), top + height + 24, label, anchor="middle")
    y_labels = tick_labels(y_ticks) if y_ticks else [""]
    for value, label in zip(y_ticks, y_labels):
        svg.add("line", x1=left - 6, x2=left + width, y1=to_y(value), y2=to_y(value), stroke=GRID)
        svg.text(left - 10, to_y(value) + 5, label, anchor="end")
    svg.add("rect", x=left, y=top, width=width, height=height, fill="none", stroke=INK)
    svg.text(left + width / 2, top + height + 50, xlabel, anchor="middle")
    if ylabel:
        x = left - 22 - text_width(max(y_labels, key=len))
        svg.text(x, top + height / 2, ylabel, anchor="middle", transform=f"rotate(-90 {x:.1f} {top + height / 2:.1f})")
    svg.text(left, top - 14, title, size=PANEL_PX, font_weight="bold")
    return to_x, to_y


def line_panel(svg, box, series, xlabel, ylabel, title, from_zero=False, markers=False):
    """One polyline per (label, style, points), in its colour and dash, on axes that fit them all."""
    points = [p for _, _, line in series for p in line]
    if not points:
        return axes(svg, box, (0, 1, [0, 1]), (0, 1, [0, 1]), xlabel, ylabel, title + " (no data)")
    xs, ys = [x for x, _ in points], [y for _, y in points]
    to_x, to_y = axes(svg, box, axis(min(xs), max(xs), tight=True), axis(0 if from_zero else min(ys), max(ys)),
                      xlabel, ylabel, title)
    for label, style, line in series:
        svg.add("polyline", points=" ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in line), fill="none",
                stroke=style["colour"], stroke_width=LINE_WIDTH, stroke_dasharray=style["dash"],
                stroke_linejoin="round", data_row=label)
        for x, y in line if markers or len(line) == 1 else []:
            marker(svg, style, to_x(x), to_y(y))
    return to_x, to_y


def bar_axis(start, values, width, room):
    """An axis from `start` whose longest bar leaves `room` pixels for its value label."""
    high = max(values)
    for _ in range(10):
        low, top, ticks = axis(start, high)
        if (max(values) - low) / (top - low) * width <= width - room:
            break
        high = top + (top - low) / 10
    return low, top, ticks


def bar_panel(svg, box, rows, values, styles, xlabel, title, start=0.0, names=True):
    """Horizontal bars, one per row in its method's colour, each with its value at its end."""
    left, top, width, height = box
    texts = numbers(values)
    x_axis = bar_axis(start, values, width, text_width(max(texts, key=len)) + 12)
    to_x, _ = axes(svg, box, x_axis, None, xlabel, None, title)
    band = height / len(rows)
    thickness = min(0.6 * band, 28)
    for i, (row, value, text) in enumerate(zip(rows, values, texts)):
        y = top + band * (i + 0.5)
        svg.add("rect", x=left, y=y - thickness / 2, width=to_x(value) - left, height=thickness,
                fill=styles[row["name"]]["colour"], stroke=INK, stroke_width=0.8, data_row=row["name"])
        svg.text(to_x(value) + 6, y + 5, text)
        if names:
            svg.text(left - 10, y + 5, clip(row["name"]), anchor="end")


def place_labels(svg, points, labels, bounds):
    """Each label beside its point, in the first spot that overlaps no point or placed label (greedy)."""
    taken = [(x - 8, y - 8, x + 8, y + 8) for x, y in points]
    for (x, y), label in zip(points, labels):
        w, h = text_width(label), FONT_PX
        spots = [(dx * r, dy * r, anchor) for r in (12, 28, 48, 72)
                 for dx, dy, anchor in ((1, 0, "start"), (-1, 0, "end"), (0, -1, "middle"), (0, 1.3, "middle"),
                                        (1, -1, "start"), (1, 1, "start"), (-1, -1, "end"), (-1, 1, "end"))]
        for dx, dy, anchor in spots:
            x0 = x + dx - {"start": 0, "middle": w / 2, "end": w}[anchor]
            box = (x0, y + dy - 0.5 * h, x0 + w, y + dy + 0.5 * h)
            inside = bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        taken.append(box)
        if abs(dx) + abs(dy) > 12:
            svg.add("line", x1=x, y1=y, x2=min(max(x, box[0]), box[2]), y2=min(max(y, box[1]), box[3]), stroke=MUTED)
        svg.text(x + dx, y + dy + 5, label, anchor=anchor)


# --- figures ---
def styles_of(rows):
    """{method name: style}: colour, dash and marker by first appearance, the same in every figure."""
    names = list(dict.fromkeys(row["name"] for row in rows))
    return {name: {"colour": COLOURS[i % len(COLOURS)], "dash": DASHES[(i + i // len(DASHES)) % len(DASHES)],
                   "marker": MARKERS[i % len(MARKERS)]} for i, name in enumerate(names)}


def entries_of(rows, styles):
    return [(row["name"], styles[row["name"]]) for row in rows]


def start_figure(comparison, width, title, entries, swatch="line"):
    """A figure with its title, provenance line and legend; returns (svg, where the plots may start)."""
    svg = Svg(width, title)
    svg.text(40, 42, title, size=TITLE_PX, font_weight="bold")
    svg.text(40, 68, provenance(comparison), fill=MUTED)
    return svg, 140 + legend(svg, 40, 90, width - 80, entries, swatch)


def end_labels(svg, series, to_x, to_y):
    """Name each line at its right end, so lines that coincide are still told apart; they share a stack."""
    stacks = {}
    for label, style, line in series:
        if line:
            stacks.setdefault(round(to_y(line[-1][1]) / 6), []).append((label, style, to_x(line[-1][0]) + 14))
    below = -math.inf
    for key in sorted(stacks):
        y = max(key * 6 - 9 * (len(stacks[key]) - 1), below + 18)  # centred on its line, clear of the one above
        for label, style, x in stacks[key]:
            svg.add("line", x1=x, x2=x + 36, y1=y, y2=y, stroke=style["colour"], stroke_width=LINE_WIDTH,
                    stroke_dasharray=style["dash"])
            svg.text(x + 44, y + 5, label)
            below, y = y, y + 18


def footnote(svg, note, y):
    """The note in muted lines from y, wrapped to the figure's width; returns the figure's height."""
    for line in textwrap.wrap(note, int((svg.width - 80) / text_width("x"))):
        svg.text(40, y, line, fill=MUTED)
        y += 20
    return y + 20


def comparison_figure(comparison, results, rows, styles):
    """Six panels: the metric and loss per epoch, sparsity and memory per step, the final metric, memory and
    efficiency (or, for a loss, wall time)."""
    width, cell_width, cell_height, metric = 1400, 700, 430, metric_of(comparison)
    svg, top = start_figure(comparison, width, describe(comparison, rows), entries_of(rows, styles))
    for i, (name, (title, xlabel, ylabel, from_zero)) in enumerate(curves_of(metric).items()):
        series = [(row["name"], styles[row["name"]], curve(results[row["label"]], name))
                  for row in rows if row["label"] in results]
        left, cell_top = cell_width * (i % 2), top + cell_height * (i // 2)
        line_panel(svg, (left + 110, cell_top, cell_width - 150, cell_height - 110), series, xlabel, ylabel,
                   title, from_zero)
    bars_top, names_px = top + 2 * cell_height, max(text_width(clip(row["name"])) for row in rows) + 24
    values = [row[metric["key"]] for row in rows]
    bar_panel(svg, (names_px + 30, bars_top, cell_width - names_px - 70, cell_height - 110), rows, values,
              styles, f"final {metric['label']}", f"Final {title_of(metric).lower()}", start=bar_start(values, metric))
    half = (cell_width - names_px - 80) / 2
    bar_panel(svg, (cell_width + names_px, bars_top, half, cell_height - 110), rows,
              [row["peak_memory_mib"] for row in rows], styles, "peak memory (MiB)", "Peak memory")
    last, xlabel, title, _ = last_panel(rows, metric)
    bar_panel(svg, (cell_width + names_px + half + 40, bars_top, half, cell_height - 110), rows,
              last, styles, xlabel, title, names=False)
    return svg, footnote(svg, missing_note(rows, results), bars_top + cell_height - 30)


def memory_figure(comparison, results, rows, styles):
    """Training memory (MiB) per optimizer step, one line per row, each named at its end."""
    svg, top = start_figure(comparison, 1200, describe(comparison, rows) + ": training memory",
                            entries_of(rows, styles))
    series = [(row["name"], styles[row["name"]], curve(results[row["label"]], "memory"))
              for row in rows if row["label"] in results]
    to_x, to_y = line_panel(svg, (110, top, 760, 520), series, "optimizer step", "allocated memory (MiB)",
                            "Memory allocated after the step", from_zero=True)
    end_labels(svg, series, to_x, to_y)
    return svg, footnote(svg, missing_note(rows, results), top + 610)


def scatter_figure(comparison, rows, styles):
    """Peak memory (MiB) against the final metric, a labelled marker per row."""
    metric = metric_of(comparison)
    svg, top = start_figure(comparison, 1100, describe(comparison, rows) + f": memory vs {noun_of(metric)}",
                            entries_of(rows, styles), swatch="marker")
    xs, ys = [row["peak_memory_mib"] for row in rows], [row[metric["key"]] for row in rows]
    x_pad, y_pad = (max(xs) - min(xs)) * 0.1 or 0.1, (max(ys) - min(ys)) * 0.1 or 0.5
    box = (110, top, 800, 540)
    to_x, to_y = axes(svg, box, axis(min(xs) - x_pad, max(xs) + x_pad), axis(min(ys) - y_pad, max(ys) + y_pad),
                      "peak memory (MiB): lower is better",
                      f"final {metric['label']}: {'higher' if metric['higher_is_better'] else 'lower'} is better",
                      f"Peak memory and final {title_of(metric).lower()}")
    points = [(to_x(x), to_y(y)) for x, y in zip(xs, ys)]
    for row, (x, y) in zip(rows, points):
        marker(svg, styles[row["name"]], x, y, radius=7)
    place_labels(svg, points, [clip(row["name"]) for row in rows], (box[0] + 4, box[1] + 4, 1090, box[1] + box[3] - 4))
    return svg, top + 620


def sweep_figure(comparison, rows, styles):
    """The final metric against sparsity, a line per pruning method; dense rows as flat lines."""
    metric, key = metric_of(comparison), metric_of(comparison)["key"]
    methods = list(dict.fromkeys(row["name"] for row in rows if row["sparsity"] > 0))
    dense = [row for row in rows if row["sparsity"] == 0]
    entries = [(name, styles[name]) for name in methods] + entries_of(dense, styles)
    svg, top = start_figure(comparison, 1100, describe(comparison, rows) + f": {noun_of(metric)} vs sparsity", entries,
                            swatch="both")
    series = [(name, styles[name], sorted((100 * row["sparsity"], row[key]) for row in rows
                                          if row["name"] == name)) for name in methods]
    swept = [100 * s for s in sparsities(rows)]
    series += [(row["name"], styles[row["name"]], [(swept[0], row[key]), (swept[-1], row[key])])
               for row in dense]
    line_panel(svg, (110, top, 950, 520), series, "sparsity (%)", f"final {metric['label']}",
               f"Final {title_of(metric).lower()} per sparsity", markers=True)
    return svg, top + 600


def render_svgs(results_dir):
    """Write every figure into `results_dir`; returns their paths."""
    comparison, results = load_comparison(results_dir)
    rows, styles = comparison["rows"], styles_of(comparison["rows"])
    shown, what = focus(rows), "accuracy" if metric_of(comparison)["higher_is_better"] else "loss"
    figures = {"comparison.svg": comparison_figure(comparison, results, shown, styles),
               "memory_timeline.svg": memory_figure(comparison, results, shown, styles),
               f"memory_vs_{what}.svg": scatter_figure(comparison, shown, styles)}
    if len(sparsities(rows)) > 1:
        figures[f"{what}_vs_sparsity.svg"] = sweep_figure(comparison, rows, styles)
    paths = []
    for name, (svg, height) in figures.items():
        paths.append(os.path.join(results_dir, name))
        svg.save(paths[-1], height)
    return paths


# --- text ---
def resample(values, width):
    """At most `width` values, sampled evenly, the last kept."""
    if len(values) <= width:
        return values
    return [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]


def sparkline(values, low, high, ascii):
    levels = SPARKS[ascii]
    return "".join(levels[min(len(levels) - 1, int((v - low) / ((high - low) or 1) * len(levels)))]
                   for v in resample(values, SPARK_COLUMNS))


def bar(value, low, high, ascii):
    eighths = round(max(0.0, (value - low) / ((high - low) or 1)) * BAR_COLUMNS * 8)
    if ascii:
        return "#" * round(eighths / 8)
    return "█" * (eighths // 8) + (EIGHTHS[eighths % 8 - 1] if eighths % 8 else "")


def curve_lines(rows, results, name, width, ascii, metric=ACCURACY):
    """One sparkline per row on a scale shared by all rows, its first and last values either side."""
    _, xlabel, ylabel, _ = curves_of(metric)[name]
    title = ylabel + (" per epoch" if xlabel == "epoch" else " per step")
    curves = {label: [y for _, y in curve(run, name)] for label, run in results.items()}
    values = [v for c in curves.values() for v in c]
    if not values:
        return [f"{title}: no data", ""]
    low, high, length = min(values), max(values), min(SPARK_COLUMNS, max(map(len, curves.values())))
    lines = [f"{title}: first, blocks on one scale ({number(low)} to {number(high)}), last"]
    for row in rows:
        c = curves.get(row["label"])
        shown = f"{number(c[0]):>7} {sparkline(c, low, high, ascii):<{length}} {number(c[-1])}" if c else "(no data)"
        lines.append(f"  {clip(row['label'], width):<{width}} {shown}")
    return lines + [""]


def bar_lines(rows, values, title, width, ascii, start=0.0):
    """A horizontal bar per row, from `start` rounded down, its value at its end."""
    low, high = nice_ticks(start, max(values))[0], max(values)
    lines = [title + (f", bars from {number(low)}" if low else "")]
    for row, value, text in zip(rows, values, numbers(values)):
        lines.append(f"  {clip(row['label'], width):<{width}} {bar(value, low, high, ascii):<{BAR_COLUMNS}} {text}")
    return lines + [""]


def sweep_lines(rows, width, metric=ACCURACY):
    """The final metric per method (rows) and sparsity (columns)."""
    swept = sparsities(rows)
    accuracy = {(row["name"], row["sparsity"]): row[metric["key"]] for row in rows}
    lines = [f"final {metric['label']} per sparsity",
             f"  {'method':<{width}}" + "".join(f"{percent(s):>9}" for s in swept)]
    for name in dict.fromkeys(row["name"] for row in rows):
        cells = [f"{number(accuracy[name, s], 4):>9}" if (name, s) in accuracy else f"{'-':>9}" for s in swept]
        if (name, 0) in accuracy:
            cells = [f"{number(accuracy[name, 0], 4):>9}"] * len(swept)
        lines.append(f"  {clip(name, width):<{width}}" + "".join(cells))
    return lines + [""]


def table_lines(rows, width, metric=ACCURACY):
    """Every row's numbers in fixed columns; CUDA runs add the peak reserved, with names clipped to keep 100 columns."""
    reserved = any(row.get("peak_reserved_mib") for row in rows)
    width = min(width, TEXT_COLUMNS - 79) if reserved else width
    accuracy = metric["key"] == "test_accuracy"
    show = (lambda v: f"{v:>8.2f}%") if accuracy else (lambda v: f"{v:>9.4f}")
    heading = "test acc" if accuracy else metric["key"].replace("_", " ")
    lines = [f"{'row':<{width}} {'sparsity':>9} {heading:>9} {'peak MiB':>9} " + "reserved " * reserved +
             f"{'mean MiB':>9} {'efficiency':>11} {'wall s':>8} {'file':>6}"]  # file: model.pruned.pt vs dense
    for row in rows:
        file_vs_dense = f"{row['file_vs_dense']:.2f}x" if row.get("file_vs_dense") else "-"
        lines.append(f"{clip(row['label'], width):<{width}} {row.get('sparsity_reached', row['sparsity']):>9.1%} "
                     f"{show(row[metric['key']])} {number(row['peak_memory_mib']):>9} "
                     + f"{number(row.get('peak_reserved_mib') or math.nan):>8} " * reserved +
                     f"{number(row.get('mean_memory_mib') or math.nan):>9} {number(row['efficiency']) if row.get('efficiency') else '-':>11} "
                     f"{row.get('wall_seconds') or math.nan:>8.1f} {file_vs_dense:>6}")
    return lines


def text_report(results_dir, ascii=False):
    """The comparison as text plots and a table, every line within 100 columns; ascii=True: pure ASCII."""
    comparison, results = load_comparison(results_dir)
    rows, metric = comparison["rows"], metric_of(comparison)
    width = min(LABEL_COLUMNS, max(len(row["label"]) for row in rows))
    lines = [describe(comparison, rows)] + textwrap.wrap(provenance(comparison), TEXT_COLUMNS) + [""]
    for name in CURVES:
        lines += curve_lines(rows, results, name, width, ascii, metric)
    values = [row[metric["key"]] for row in rows]
    lines += bar_lines(rows, values, f"final {metric['label']}", width, ascii, bar_start(values, metric))
    lines += bar_lines(rows, [row["peak_memory_mib"] for row in rows], "peak memory (MiB)", width, ascii)
    last, _, _, text_title = last_panel(rows, metric)
    lines += bar_lines(rows, last, text_title, width, ascii)
    if len(sparsities(rows)) > 1:
        lines += sweep_lines(rows, width, metric)
    lines += table_lines(rows, width, metric)
    text = "\n".join(lines + textwrap.wrap(missing_note(rows, results), TEXT_COLUMNS))
    return text.encode("ascii", "replace").decode() if ascii else text


# --- main ---
# --- the default importance score, by the README's rule, from ablations on several seeds ---
STATE_SCORES = ("variance", "hybrid", "momentum")  # the scores that use the optimizer's states


def score_decision(results_dirs):
    """(table lines, chosen score) from `train.py --compare --ablation` run once per seed. Per
    seed, each score's metric (accuracy; the GPT's validation loss) is averaged over the sparsities; the
    best state score is the default unless magnitude beats it by more than two standard errors of their
    per-seed difference."""
    accuracy, metrics = {}, []  # (importance, sparsity): [the metric, one per seed]
    for results_dir in results_dirs:
        comparison = load_comparison(results_dir)[0]
        metrics.append(metric := metric_of(comparison))
        for row in comparison["rows"]:
            if row.get("importance"):
                accuracy.setdefault((row["importance"], row["sparsity"]), []).append(row[metric["key"]])
    if any(m != metrics[0] for m in metrics):
        raise PlotInputError("the ablations are judged by different metrics: give folders of one model")
    sign = 1 if metrics[0]["higher_is_better"] else -1  # better = larger sign * value
    scores, sparsities = sorted({i for i, _ in accuracy}), sorted({s for _, s in accuracy})
    seeds = len(results_dirs)
    if seeds < 2 or "magnitude" not in scores or any(len(v) != seeds for v in accuracy.values()):
        raise PlotInputError("the rule needs ablations (train.py --compare --ablation) of the same scores and "
                             "sparsities on at least two seeds, one folder each")
    per_seed = {i: [statistics.fmean(a) for a in zip(*(accuracy[i, s] for s in sparsities))] for i in scores}
    mean = {i: statistics.fmean(per_seed[i]) for i in scores}
    best = max((i for i in scores if i in STATE_SCORES), key=lambda i: sign * mean[i])
    difference = [m - b for m, b in zip(per_seed["magnitude"], per_seed[best])]
    standard_error = statistics.stdev(difference) / math.sqrt(seeds)
    chosen = "magnitude" if sign * statistics.fmean(difference) > 2 * standard_error else best
    se = lambda values: statistics.stdev(values) / math.sqrt(len(values))  # noqa: E731
    d, w = (2, 9) if sign > 0 else (4, 7)  # decimals: points of accuracy; nats of a loss
    lines = [f"{'score':<10}" + "".join(f" {f'{s:.0%} sparsity':>{w + d + 5}}" for s in sparsities)
             + f" {'mean':>{w + d + 3}}"]
    for i in scores:
        lines.append(f"{i:<10}" + "".join(f" {statistics.fmean(accuracy[i, s]):>{w}.{d}f} ± {se(accuracy[i, s]):.{d}f}"
                                          for s in sparsities) + f" {mean[i]:>7.{d}f} ± {se(per_seed[i]):.{d}f}")
    label = "test accuracy %" if sign > 0 else metrics[0]["label"]
    lines.append(f"{label}, mean ± standard error over {seeds} seeds. magnitude - {best} (the best state "
                 f"score): {statistics.fmean(difference):+.{d}f} ± {standard_error:.{d}f}{' points' * (sign > 0)}, "
                 f"so the default is {chosen}" + (" (magnitude leads by more than two standard errors)" if chosen == "magnitude" else
                                " (magnitude does not lead it by more than two standard errors)"))
    return lines, chosen


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Re-render a comparison's plots from its saved results.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR", nargs="+",
                        help="the directory `train.py --compare --out` wrote (with --scores: one per seed)")
    parser.add_argument("--scores", action="store_true", help="ablations on several seeds: the default importance "
                        "score by the README's rule, with its table (default: off)")
    parser.add_argument("--plot", choices=("svg", "text", "both"), default="both",
                        help="SVG files, text plots on stdout, or both (default: both)")
    parser.add_argument("--ascii", action="store_true", help="text plots in pure ASCII (default: Unicode "
                                                              "where stdout can encode it)")
    args = parser.parse_args(argv)
    if len(args.results_dir) > 1 and not args.scores:
        parser.error("several RESULTS_DIRs are for --scores; give one comparison to plot")
    return args


def stdout_takes_unicode():
    try:
        (SPARKS[False] + EIGHTHS).encode(sys.stdout.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.scores:
            print("\n".join(score_decision(args.results_dir)[0]))
            return
        if args.plot in ("svg", "both"):
            for path in render_svgs(args.results_dir[0]):
                print(f"wrote {path}")
        if args.plot in ("text", "both"):
            print(text_report(args.results_dir[0], ascii=args.ascii or not stdout_takes_unicode()))
    except PlotInputError as error:
        print(f"plot.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
