"""Score-vs-compression tables (Markdown) and plots (PNG) from results folders, ours or kvpress's."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

from fastkvzip_press.evaluation.registry import PRESS_SPECS
from fastkvzip_press.evaluation.results import RunSummary, collect_runs


def _is_ours(press_name: str) -> bool:
    spec = PRESS_SPECS.get(press_name)
    return bool(spec and spec.ours)


def _knob(press_name: str) -> str:
    """ "ratio", "threshold" or "none"; presses not in our registry (kvpress's own folders) are ratio presses."""
    spec = PRESS_SPECS.get(press_name)
    return spec.knob if spec is not None else "ratio"


def _x(run: RunSummary) -> float:
    """Where a run sits on the ratio axis: the ratio its press recorded (achieved, for threshold presses)."""
    return run.compression_ratio if not math.isnan(run.compression_ratio) else run.value


logger = logging.getLogger(__name__)

README_START = "<!-- {name}:start -->"
README_END = "<!-- {name}:end -->"


def markdown_table(runs: list[RunSummary], per_task: bool = True) -> str:
    """One section per (dataset, data_dir): a press x ratio table of mean scores, then (``per_task``) per-task
    scores.

    Cells read ``score`` (mean over tasks, percent) with the stored KV fraction when measured, e.g. ``62.5 (0.51)``;
    threshold presses list each threshold with its achieved ratio.
    """
    sections = []
    groups: dict[tuple[str, str, str], list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.data_dir, run.model)].append(run)
    for (dataset, data_dir, model), group in groups.items():
        ratios = sorted({round(r.value, 4) for r in group if _knob(r.press_name) == "ratio"})
        rows: dict[str, dict[float, RunSummary]] = defaultdict(dict)
        for run in group:
            rows[run.press_name][round(run.value, 4)] = run
        n_rows = max(r.n_rows for r in group)
        tasks = sorted({task for r in group for task in r.task_scores})
        lines = [
            f"**{dataset}, {data_dir} tokens, {model}**: mean string-match score (%) over {len(tasks)} task(s), "
            f"{n_rows} samples per run; in brackets the stored KV bytes over the full cache's.",
            "",
            "| press | " + " | ".join(f"ratio {ratio:.2f}" for ratio in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        order = sorted(rows, key=lambda name: (name != "no_press", not _is_ours(name), name))
        for name in order:
            by_value = rows[name]
            label = f"**{name}**" if _is_ours(name) else name
            if _knob(name) == "threshold":
                cells = ", ".join(
                    f"t={run.value:g}: {run.score:.1f} at ratio {run.compression_ratio:.2f}"
                    for run in sorted(by_value.values(), key=lambda r: r.value)
                )
                lines.append(f"| {label} | {cells} |" + " |" * (len(ratios) - 1))
                continue
            cells = []
            for ratio in ratios:
                run = by_value.get(ratio) or (by_value.get(0.0) if name == "no_press" else None)
                if run is None:
                    cells.append("")
                else:
                    kv = "" if math.isnan(run.kv_fraction) else f" ({run.kv_fraction:.2f})"
                    cells.append(f"{run.score:.1f}{kv}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if per_task:
            lines += ["", "Per task (string match %; value = ratio, or threshold for threshold presses):", ""]
            lines.append("| press | value | " + " | ".join(tasks) + " |")
            lines.append("|---|---|" + "---|" * len(tasks))
            for name in order:
                for run in sorted(rows[name].values(), key=lambda r: r.value):
                    scores = " | ".join(f"{run.task_scores.get(task, math.nan):.0f}" for task in tasks)
                    lines.append(f"| {name} | {run.value:g} | {scores} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def replace_readme_block(readme: Path, name: str, content: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``readme``."""
    text = readme.read_text()
    start, end = README_START.format(name=name), README_END.format(name=name)
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{content.strip()}\n{end}{tail}")


def plot_scores(runs: list[RunSummary], path: Path) -> Path:
    """Score vs compression ratio, one panel per (dataset, data_dir), one line per press; ours solid and thick,
    kvpress's dashed, the full cache a dotted horizontal line. One legend for all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[RunSummary]] = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.data_dir)].append(run)
    names = sorted({run.press_name for run in runs if run.press_name != "no_press"}, key=lambda n: (not _is_ours(n), n))
    palette = plt.get_cmap("tab10").colors + ((0.35, 0.35, 0.35), (0.6, 0.4, 0.0))
    styles = {name: (palette[i % len(palette)], "osD^v<>ph*XP"[i % 12]) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups) + 2.5, 4.8), squeeze=False)
    handles: dict[str, object] = {}
    for axis, ((dataset, data_dir), group) in zip(axes[0], groups.items()):
        by_press: dict[str, list[RunSummary]] = defaultdict(list)
        for run in group:
            by_press[run.press_name].append(run)
        for name, press_runs in sorted(by_press.items()):
            if name == "no_press":
                handles["no_press (full cache)"] = axis.axhline(press_runs[0].score, color="black", linestyle=":")
                continue
            points = sorted((_x(run), run.score) for run in press_runs)
            ours = _is_ours(name)
            color, marker = styles[name]
            (line,) = axis.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker=marker,
                linestyle="-" if ours else "--",
                linewidth=2.4 if ours else 1.2,
                color=color,
            )
            handles[name + (" (ours)" if ours else "")] = line
        axis.set_title(f"{dataset}, {data_dir} tokens")
        axis.set_xlabel("compression ratio (fraction of KV pairs removed)")
        axis.set_ylabel("mean string-match score (%)")
        axis.set_xlim(0.0, 1.0)
        axis.grid(alpha=0.3)
    top = min(102.0, max(run.score for run in runs) + 15)
    for axis in axes[0]:
        axis.set_ylim(-2, top)
    order = sorted(handles, key=lambda label: (not label.startswith("no_press"), "(ours)" not in label, label))
    fig.legend([handles[label] for label in order], order, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Path, out: Path, command: str, readme: Path | None = None) -> Path:
    """Write ``<dataset>.md`` and ``<dataset>.png`` of the finished runs under ``results`` into ``out`` (and fill the
    README block when ``readme`` is given); returns the ``.md`` path."""
    runs = collect_runs(results)
    if not runs:
        raise ValueError(f"{results} holds no finished runs (folders with predictions.csv and metrics.json)")
    out.mkdir(parents=True, exist_ok=True)
    stem = runs[0].dataset
    plot = plot_scores(runs, out / f"{stem}.png")
    table = out / f"{stem}.md"
    settings = "each run's settings are in its folder's config.yaml"
    table.write_text(markdown_table(runs) + f"\nReport command: `{command}`; {settings}.\n")
    if readme is not None:
        replace_readme_block(readme, stem, markdown_table(runs, per_task=False))
    logger.info("report: %s and %s", table, plot)
    return table
