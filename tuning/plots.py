"""PNG plots beside a tuned policy: optimisation history, parameter importances, GAP vs. threshold.

Written with matplotlib's Agg backend (no display needed). A plot that cannot be drawn (too few
trials for importances, no searched study for a preset) is skipped, never an error.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np

MIN_TRIALS_FOR_IMPORTANCE = 10


def _pyplot():
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from submissions.files import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def write_plots(study, policy: dict, tune_part, hold_part, out: str | os.PathLike) -> list[Path]:
    """Write `<stem>.history.png`, `<stem>.importance.png` (≥ 10 finished trials) and
    `<stem>.threshold.png` beside `out`; returns the paths written."""
    plt = _pyplot()
    out = Path(out)
    stem = out.with_name(out.stem)
    written: list[Path] = []
    if study is not None:
        import optuna
        from optuna.trial import TrialState

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        from optuna.visualization import matplotlib as ovm

        n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        jobs = [("history", ovm.plot_optimization_history)]
        if n_done >= MIN_TRIALS_FOR_IMPORTANCE:
            jobs.append(("importance", ovm.plot_param_importances))
        for name, fn in jobs:
            try:
                ax = fn(study)
            except Exception:  # e.g. importances of a study whose parameters never varied
                plt.close("all")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, max(5.0, 0.3 * len(fig.axes[0].get_yticklabels())) if name == "importance" else 5)
            written.append(_save(fig, Path(f"{stem}.{name}.png")))
            plt.close(fig)
    written.append(_threshold_plot(plt, policy, tune_part, hold_part, Path(f"{stem}.threshold.png")))
    return written


def _threshold_plot(plt, policy: dict, tune_part, hold_part, path: Path) -> Path:
    """GAP on both parts as one threshold of the chosen policy moves (others fixed)."""
    from tuning.space import Space

    hi = Space.of(tune_part.data).hi
    ts = np.unique(np.linspace(0, hi, min(hi + 1, 60)).round().astype(int))
    fig, ax = plt.subplots(figsize=(8, 5))
    curves: list[tuple[str, callable, float | None]] = []
    if policy["kind"] == "bands":
        for b, band in enumerate(policy["bands"]):
            def vary(t, b=b):
                p = copy.deepcopy(policy)
                p["bands"][b]["demote_below"] = int(t)
                return p
            lo = policy["edges"][b - 1] if b else None
            up = policy["edges"][b] if b < len(policy["edges"]) else None
            label = f"band {b} ({'' if lo is None else f'{lo:.3g} <= '}score{'' if up is None else f' < {up:.3g}'})"
            curves.append((label + ": demote below", vary, band["demote_below"]))
        xlabel = "minimum aggregated inliers (demote below)"
    elif policy["kind"] == "blend":
        def vary(t):
            p = copy.deepcopy(policy)
            p["b"] = float(t)
            return p
        curves.append(("blend: sigmoid centre b", vary, policy["b"]))
        xlabel = "inlier count at the sigmoid's centre (b)"
    else:  # identity: what a single "halve the confidence below t inliers" rule would do
        def vary(t):
            return {"format": policy["format"], "version": policy["version"], "kind": "bands", "aggregator": "max",
                    "edges": [], "bands": [{"k": 1, "demote_below": int(t), "demote": "factor", "demote_to": 0.5,
                                            "promote_at": None, "promote_to": 0.0}], "swap": None, "frequency": None}
        curves.append(("halve confidence below t inliers (what-if)", vary, None))
        xlabel = "minimum inliers (max over 1 reference)"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, vary, chosen) in enumerate(curves):
        c = colors[i % len(colors)]
        ax.plot(ts, [tune_part.gap(vary(t)) for t in ts], color=c, label=f"{label} — tuning")
        if hold_part is not None and hold_part.data.n:
            ax.plot(ts, [hold_part.gap(vary(t)) for t in ts], color=c, linestyle="--", label="  held-out")
        if chosen is not None:
            ax.axvline(float(chosen), color=c, linestyle=":", alpha=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GAP")
    ax.set_title(f"GAP vs. threshold, {policy['kind']} policy (dotted: chosen value)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path
