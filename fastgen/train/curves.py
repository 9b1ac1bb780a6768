"""curves.png: a run's metrics.jsonl drawn as curves against the step, one panel per group of fields the family
names (Family.curves); a field missing from every record leaves its panel out. Redrawn after every evaluation
and at the end of a run, so a run in progress can be watched."""
import json
import os
from typing import Sequence, Tuple

CURVES = "curves.png"


def _series(path):
    """{field: ([steps], [values])} of every numeric field of the records in ``path``."""
    series = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = record["step"]
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    return series


def draw_curves(metrics_path: str, png_path: str, panels: Sequence[Tuple[str, Sequence[str]]]) -> bool:
    """Draw the ``panels`` of ``metrics_path`` into ``png_path`` (written atomically); False when there is
    nothing to draw."""
    if not panels or not os.path.exists(metrics_path):
        return False
    series = _series(metrics_path)
    shown = [(title, [k for k in keys if k in series]) for title, keys in panels]
    shown = [(title, keys) for title, keys in shown if keys]
    if not shown:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only: no display is needed or touched
    import matplotlib.pyplot as plt

    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    try:
        for ax, (title, keys) in zip(axes.flat, shown):
            for key in keys:
                steps, values = series[key]
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(shown):]:
            ax.set_visible(False)
        fig.tight_layout()
        tmp = png_path + ".tmp"
        fig.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
    return True
