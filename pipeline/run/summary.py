"""The figures of a finished run, read back from its manifest: the table `glr run` and `glr demo` print.

The report (`pipeline.run.report`) shows the same rows; both read what the stages recorded, so
a run folder says what really happened.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from pipeline.run.config import is_retrieval
from pipeline.run.layout import Layout

_REL = Layout(Path(""))  # run-folder-relative names, as stage records store them

def tune_parts(metrics: dict) -> dict:
    """{'tuning': (before, after), 'held-out': (before, after)} GAPs from `tune`'s result, when present."""
    out = {}
    for part, key in (("tuning", "tune"), ("held-out", "holdout")):
        d = metrics.get(key)
        if isinstance(d, dict) and "before" in d and "after" in d:
            b, a = d["before"], d["after"]
            b = b.get("gap") if isinstance(b, dict) else b
            a = a.get("gap") if isinstance(a, dict) else a
            out[part] = (b, a)
    return out


def summary_rows(manifest: dict) -> list[tuple[str, float | None, float | None]]:
    """(what, GAP on the local validation queries, GAP on the competition's test set or None)."""
    stages = manifest.get("stages", {})

    def gaps(name: str) -> tuple[float | None, float | None]:
        m = stages.get(name, {}).get("metrics", {}) or {}
        val, test = m.get("val") or {}, m.get("test") or {}
        return val.get("gap"), test.get("gap")

    retrieval = {m.get("name") for m in (manifest.get("config") or {}).get("models", []) if is_retrieval(m)}
    rows = []
    for name in manifest.get("plan", []):
        if name.startswith("predict:"):
            model = name.split(":", 1)[1]
            rows.append((f"model {model}{' (kNN)' if model in retrieval else ''}", *gaps(name)))
    rows.append(("ensemble", *gaps("ensemble")))
    rows.append(("ensemble + rescoring", *gaps("rescore")))
    return rows


def predicting_models(manifest: dict) -> str | None:
    """One line saying which models produced the test predictions (None before any predict stage ran).

    Read from what the predict stages recorded, so a run folder says what really happened.
    """
    stages = manifest.get("stages", {})
    folders = {}
    for name in manifest.get("plan", []):
        rec = stages.get(name, {})
        if name.startswith("predict:") and rec.get("status") == "done":
            model = name.split(":", 1)[1]
            folders[model] = ((rec.get("metrics") or {}).get("models") or {}).get("test", "")
    if not folders:
        return None
    full = [m for m, f in folders.items() if f == _REL.model_dir(m, full=True).as_posix()]
    split = [m for m in folders if m not in full]
    if not split:
        return (f"test predictions: models retrained on the full training set ({', '.join(folders.values())}); "
                f"local val: the split models ({_REL.model_dir('').as_posix()}/)")
    line = (f"test predictions: the local-validation models ({', '.join(folders[m] for m in split)}), which never "
            "saw the left-out classes nor the held-out images ([train] final_fit = \"all\" retrains on everything)")
    if full:
        line += f"; retrained on the full training set: {', '.join(folders[m] for m in full)}"
    return line


def summary_table(manifest: dict) -> str:
    """The final table `glr run` / `glr demo` print: GAPs, time per stage, submission and report paths."""
    stages = manifest.get("stages", {})

    def f(x):
        return "    -" if x is None else f"{x:.4f}"

    rows = summary_rows(manifest)
    has_test = any(t is not None for _, _, t in rows)
    w = max([24] + [len(what) + 1 for what, _, _ in rows])
    lines = ["", f"{'GAP':<{w}} {'local val':>10}" + (f" {'test':>8}" if has_test else "")]
    for what, val, test in rows:
        lines.append(f"{what:<{w}} {f(val):>10}" + (f" {f(test):>8}" if has_test else ""))
    which = predicting_models(manifest)
    if which:
        lines += textwrap.wrap(which, 100, subsequent_indent="  ", break_on_hyphens=False)
    parts = tune_parts(stages.get("tune", {}).get("metrics", {}) or {})
    if parts:
        lines += ["", f"{'rescoring (local val)':<24} {'before':>10} {'after':>8}"]
        for part, (before, after) in parts.items():
            lines.append(f"  {part + ' part':<22} {f(before):>10} {f(after):>8}")
    lines += ["", "time per stage"]
    total = 0.0
    skipped = {r["stage"] for r in manifest.get("last_plan", []) if r["action"] == "skip"}
    for name in manifest.get("plan", []):
        rec = stages.get(name, {})
        sec = rec.get("seconds")
        if sec is None:
            lines.append(f"  {name:<20} {'not run':>9}")
            continue
        note = "  (skipped now: unchanged)" if name in skipped else ""
        if name not in skipped:
            total += sec
        lines.append(f"  {name:<20} {sec:>8.1f}s{note}")
    lines.append(f"  {'total (this run)':<20} {total:>8.1f}s")
    sub = stages.get("submission", {}).get("metrics", {}).get("path")
    rep = stages.get("report", {}).get("metrics", {}).get("path")
    lines += ["", f"submission: {sub or '-'}", f"report:     {rep or '-'}"]
    return "\n".join(lines)
