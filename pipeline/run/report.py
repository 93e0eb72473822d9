"""`report.html`: one self-contained page a person opens after a run (no server, no network).

Sections: the results table (GAPs, time per stage, paths), training curves, GAP vs. confidence
before/after rescoring, inlier histograms (correct vs wrong top-1 vs non-landmark), the Optuna
plots, example queries with their best reference and the inlier matches drawn, and the run
manifest (versions, config, timings). Images are embedded as base64 PNG. A section whose
artefacts are missing says so instead of failing, so a partial run still gets a report.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.run.layout import Layout, solution_of
from submissions.files import atomic_write_text

SECTIONS = [("summary", "Results"), ("training", "Training curves"), ("gap-confidence", "GAP vs. confidence"),
            ("inliers", "Inlier counts"), ("optuna", "Tuning (Optuna)"), ("examples", "Example queries"),
            ("manifest", "Run manifest")]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;
color:#222;background:#fafafa}
h1{margin-bottom:.1em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .7em;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#eee}
img{max-width:100%;border:1px solid #ddd;background:white;margin:.3em 0}
.figs{display:flex;flex-wrap:wrap;gap:1em} .figs figure{margin:0;flex:1 1 45%} figcaption{font-size:.9em;color:#555}
pre{background:#fff;border:1px solid #ddd;padding:1em;overflow:auto;max-height:40em;font-size:.85em}
.note{color:#777;font-style:italic} nav a{margin-right:1em} .up{color:#070} .down{color:#a00}
"""

# marks <body data-images-ok / data-images-broken> once loaded: lets a headless browser check every image decodes
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-ok', ok);
  document.body.setAttribute('data-images-broken', imgs.length - ok);
});
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _img_file(path: Path, caption: str) -> str:
    return _img(base64.b64encode(Path(path).read_bytes()).decode(), caption, caption)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


# -- data helpers -----------------------------------------------------------------------------

def top1_with_truth(preds: pd.DataFrame, solution_path: Path) -> pd.DataFrame:
    """One row per query: id, landmarks, usage, landmark_id, score (rank 0), landmark_query, correct
    (as the metric decides: submissions.metric.is_correct)."""
    from submissions.format import read_solution
    from submissions.metric import is_correct

    sol = read_solution(solution_path)
    top = preds[preds["rank"] == 0][["id", "landmark_id", "score"]]
    df = sol[["id", "landmarks", "usage"]].merge(top, on="id", how="left")
    df["landmark_query"] = df["landmarks"].map(len) > 0
    df["correct"] = is_correct(df["landmark_id"].to_numpy(dtype=np.float64), df["landmarks"])
    return df


def gap_curve(top: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(confidence threshold, GAP when only predictions at or above it are kept), from the metric's own
    ranking and sum (submissions.metric.gap_curve) over the scored (not Ignored) queries, so that the
    curve ends at exactly the GAP `glr gap` reports."""
    from submissions.metric import gap_curve as metric_gap_curve

    scored = top[top["usage"] != "Ignored"] if "usage" in top else top
    m = int(scored["landmark_query"].sum())
    t = scored.dropna(subset=["score"])
    if m == 0 or len(t) == 0:
        return np.array([]), np.array([])
    id_rank = np.unique(t["id"].astype(str).to_numpy(dtype=object), return_inverse=True)[1]  # ties: id ascending
    return metric_gap_curve(t["score"].to_numpy(dtype=np.float64), t["correct"].to_numpy(dtype=bool), m,
                            tie_key=id_rank)


def max_inliers_top1(top: pd.DataFrame, inliers: pd.DataFrame) -> pd.Series:
    """Per query, the most inliers any reference of its top-1 class got (0 when none verified)."""
    best = inliers.groupby(["id", "landmark_id"])["inliers"].max().rename("max_inliers").reset_index()
    merged = top[["id", "landmark_id"]].merge(best, on=["id", "landmark_id"], how="left")
    return merged["max_inliers"].fillna(0).set_axis(top.index)


# -- sections ---------------------------------------------------------------------------------

def _summary_section(lay: Layout, manifest: dict) -> str:
    from pipeline.run.summary import predicting_models, summary_rows, tune_parts

    stages = manifest.get("stages", {})
    rows = summary_rows(manifest)
    has_test = any(t is not None for _, _, t in rows)
    out = ["<table><tr><th>GAP</th><th>local validation</th>" + ("<th>test</th>" if has_test else "") + "</tr>"]
    for what, val, test in rows:
        out.append(f"<tr><td>{html.escape(what)}</td><td>{_fmt(val)}</td>"
                   + (f"<td>{_fmt(test)}</td>" if has_test else "") + "</tr>")
    out.append("</table>")
    which = predicting_models(manifest)
    if which:
        out.append(_note(which[0].upper() + which[1:] + "."))
    parts = tune_parts(stages.get("tune", {}).get("metrics", {}) or {})
    if parts:
        out.append("<h3>Rescoring on the validation queries</h3><table><tr><th>part</th><th>before</th>"
                   "<th>after</th><th>change</th></tr>")
        for part, (before, after) in parts.items():
            d = None if before is None or after is None else after - before
            cls = "up" if d and d > 0 else "down"
            out.append(f"<tr><td>{html.escape(part)} part</td><td>{_fmt(before)}</td><td>{_fmt(after)}</td>"
                       f"<td class='{cls}'>{'–' if d is None else f'{d:+.4f}'}</td></tr>")
        out.append("</table>")
        out.append(_note("Tuning part: the validation queries Optuna chose the policy on; held-out part: "
                         "the ones it never saw — the honest estimate of what rescoring gains."))
    bundle = (stages.get("bundle", {}).get("metrics") or {})
    if bundle.get("bytes") is not None:
        out.append("<h3>Kaggle code competition</h3>" + _note(
            f"Bundle (dataset {html.escape(str(bundle.get('dataset', '')))}): {bundle['bytes'] / 2**20:.1f} MiB in "
            f"{bundle.get('files', '?')} files, in bundle/; notebook in kernel/. The notebook's time on the hidden "
            "test set: `glr infer RUN --data-dir DATA_DIR --expect-test N` projects it and refuses when it exceeds "
            "the time limit."))
    out.append("<h3>Time per stage</h3><table><tr><th>stage</th><th>seconds</th><th>finished</th></tr>")
    for name in manifest.get("plan", []):
        rec = stages.get(name, {})
        sec = rec.get("seconds")
        when = rec.get("finished") or ("this page" if name == "report" else rec.get("status", "not run"))
        out.append(f"<tr><td>{html.escape(name)}</td><td>{'–' if sec is None or name == 'report' else f'{sec:.1f}'}"
                   f"</td><td>{html.escape(str(when))}</td></tr>")
    out.append("</table>")
    sub = stages.get("submission", {}).get("metrics", {}).get("path")
    out.append(f"<p>Submission: <code>{html.escape(str(sub or '–'))}</code><br>"
               f"Run folder: <code>{html.escape(str(lay.root))}</code></p>")
    return "\n".join(out)


def _training_section(lay: Layout, manifest: dict) -> str:
    figs = []
    for name in manifest.get("plan", []):
        if not name.startswith(("train:", "train_all:")):
            continue
        full = name.startswith("train_all:")
        mdir = lay.model_dir(name.split(":", 1)[1], full)
        model = name.split(":", 1)[1] + (" (full training set)" if full else "")
        pngs = sorted(mdir.glob("*.png")) if mdir.is_dir() else []
        if pngs:
            figs += [_img_file(p, f"{model}: {p.stem}") for p in pngs]
            continue
        hist = _history(mdir)
        if hist is not None:
            figs.append(_img(_plot_history(hist, model), f"{model} training curve", f"{model}: training curve"))
        else:
            figs.append(_note(f"{model}: no training curve found in {mdir}"))
    return f'<div class="figs">{"".join(figs)}</div>' if figs else _note("no models trained yet")


def _history(mdir: Path) -> pd.DataFrame | None:
    for name in ("history.csv", "history.json"):
        p = mdir / name
        if p.exists():
            try:
                return pd.read_csv(p) if p.suffix == ".csv" else pd.DataFrame(json.loads(p.read_text()))
            except (ValueError, OSError):
                return None
    return None


def _plot_history(hist: pd.DataFrame, model: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("accuracy", "loss")):
        for col in (key, f"val_{key}"):
            if col in hist:
                ax.plot(np.arange(1, len(hist) + 1), hist[col], marker="o", label=col)
        ax.set_title(f"{model}: {key}")
        ax.set_xlabel("epoch")
        ax.legend()
    return _png(fig)


def _curve_section(lay: Layout, data_dir: Path | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from submissions.tables import read_predictions

    figs = []
    for part, sol in (("local validation", solution_of(lay.localval)),
                      ("test", solution_of(data_dir) if data_dir else None)):
        tag = "val" if part == "local validation" else "test"
        before, after = lay.ensemble(tag), lay.rescored(tag)
        if sol is None or not before.exists():
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, path in (("before rescoring", before), ("after rescoring", after)):
            if not path.exists():
                continue
            x, y = gap_curve(top1_with_truth(read_predictions(path), sol))
            if len(x):
                ax.step(x, y, where="post", label=f"{label} (GAP {y[-1]:.3f})")
        ax.set_xlabel("confidence threshold (predictions below it dropped)")
        ax.set_ylabel("GAP")
        ax.set_title(f"GAP vs. confidence — {part}")
        ax.invert_xaxis()
        ax.legend(loc="lower right")
        figs.append(_img(_png(fig), f"GAP vs confidence, {part}", f"{part}: reading right to left, GAP as the "
                         "threshold falls; rescoring pushes wrong and non-landmark answers to low confidence"))
    if not figs:
        return _note("no predictions with ground truth yet")
    return f'<div class="figs">{"".join(figs)}</div>'


def _inlier_section(lay: Layout) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from submissions.tables import read_inliers, read_predictions

    preds_p, inl_p, sol = lay.ensemble("val"), lay.inliers("val"), lay.localval_solution
    if not (preds_p.exists() and inl_p.exists() and sol.exists()):
        return _note("no verified validation queries yet")
    top = top1_with_truth(read_predictions(preds_p), sol).dropna(subset=["landmark_id"])
    top["max_inliers"] = max_inliers_top1(top, read_inliers(inl_p))
    groups = {"correct top-1": top[top["correct"]], "wrong top-1 (landmark query)":
              top[~top["correct"] & top["landmark_query"]], "non-landmark query": top[~top["landmark_query"]]}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    hi = max(1, int(top["max_inliers"].max()))
    bins = np.linspace(0, hi + 1, min(40, hi + 2))
    for (label, g), color in zip(groups.items(), ("tab:green", "tab:red", "tab:gray")):
        ax.hist(g["max_inliers"], bins=bins, alpha=.55, color=color, label=f"{label} (n={len(g)})")
    ax.set_xlabel("max RANSAC inliers over the top-1 class's references")
    ax.set_ylabel("queries")
    ax.legend()
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{len(g)}</td><td>{g['max_inliers'].median() if len(g) else 0:.0f}"
                   f"</td></tr>" for k, g in groups.items())
    return (_img(_png(fig), "inlier histogram", "local validation queries: what verification sees")
            + f"<table><tr><th>group</th><th>queries</th><th>median inliers</th></tr>{rows}</table>")


def _optuna_section(lay: Layout, metrics: dict) -> str:
    tdir, policy = lay.tune_dir, lay.policy
    parts = []
    if policy.exists():
        try:
            text = json.dumps(json.loads(policy.read_text()), indent=2)
        except json.JSONDecodeError:
            text = policy.read_text()
        parts.append(f"<details open><summary>policy.json</summary><pre>{html.escape(text)}</pre></details>")
    pngs = sorted(tdir.rglob("*.png")) if tdir.is_dir() else []
    if pngs:
        parts.append('<div class="figs">' + "".join(_img_file(p, p.stem.replace("_", " ")) for p in pngs) + "</div>")
    if metrics:
        parts.append(f"<details><summary>tune result</summary><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"
                     "</details>")
    return "".join(parts) or _note("tuning has not run yet")


def _examples_section(lay: Layout, cfg: dict, n: int) -> str:
    from pipeline.acquire.competition import Competition
    from submissions.tables import read_inliers, read_predictions

    lv = lay.localval
    preds_p, inl_p = lay.ensemble("val"), lay.inliers("val")
    if n == 0 or not (preds_p.exists() and inl_p.exists() and lay.localval_solution.exists()):
        return _note("no verified validation queries yet")
    from pipeline.verify.matching import match_pair

    comp = Competition(lv)
    top = top1_with_truth(read_predictions(preds_p), lay.localval_solution).dropna(subset=["landmark_id"])
    inl = read_inliers(inl_p)
    best = inl.sort_values(["inliers", "ref_id"], ascending=[False, True]).drop_duplicates(["id", "landmark_id"])
    top = top.merge(best[["id", "landmark_id", "ref_id", "inliers"]], on=["id", "landmark_id"], how="inner")
    groups = [("correct", top[top["correct"]]), ("wrong", top[~top["correct"] & top["landmark_query"]]),
              ("non-landmark", top[~top["landmark_query"]])]
    picked = []
    per = max(1, n // 3)
    for label, g in groups:  # the most confident of each kind: what rescoring has to get right
        picked += [(label, r) for r in g.sort_values("score", ascending=False).head(per).itertuples()]
    extractor = (cfg.get("verify") or {}).get("extractor", "sift")
    figs = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, r) in enumerate(picked[:n]):
            out = Path(tmp) / f"{i}.png"
            try:
                res = match_pair(comp.image_path(r.id, "test"), comp.image_path(r.ref_id, "train"),
                                 extractor=extractor, plot=out)
            except Exception as e:  # a broken example must not cost the whole report
                figs.append(_note(f"{r.id}: could not draw ({e})"))
                continue
            truth = ", ".join(map(str, r.landmarks)) or "non-landmark"
            cap = (f"{label}: query {r.id} (truth {truth}) → predicted {int(r.landmark_id)} at {r.score:.3f}; "
                   f"best reference {r.ref_id} ({int(r.inliers)} inliers in verification; drawn: {res['inliers']})")
            figs.append(_img_file(out, cap))
    return f'<div class="figs">{"".join(figs)}</div>' if figs else _note("no example could be drawn")


def render(run_dir: str | os.PathLike, cfg: dict, manifest: dict) -> str:
    """The report's HTML text for a run folder."""
    run_dir = Path(run_dir)
    lay = Layout(run_dir)
    data_dir = Path(cfg["data"]["data_dir"]) if cfg.get("data", {}).get("data_dir") else None
    stages = manifest.get("stages", {})
    body = {
        "summary": _summary_section(lay, manifest),
        "training": _training_section(lay, manifest),
        "gap-confidence": _curve_section(lay, data_dir),
        "inliers": _inlier_section(lay),
        "optuna": _optuna_section(lay, stages.get("tune", {}).get("metrics", {}) or {}),
        "examples": _examples_section(lay, cfg, int(cfg.get("report", {}).get("examples", 6))),
        "manifest": "<pre>" + html.escape(json.dumps({k: manifest.get(k) for k in ("versions", "config", "stages")},
                                                     indent=2, default=str)) + "</pre>",
    }
    nav = " ".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title in SECTIONS)
    sections = "\n".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body[sid]}\n</section>'
                         for sid, title in SECTIONS)
    name = html.escape(str(cfg.get("run", {}).get("name", run_dir.name)))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>glr report: {name}</title>"
            f"<style>{CSS}</style><script>{SCRIPT}</script></head>\n<body><h1>glr report: {name}</h1>"
            f"<p class=\"note\">{html.escape(manifest.get('updated', ''))} · {html.escape(str(run_dir))}</p>"
            f"<nav>{nav}</nav>\n{sections}\n</body></html>\n")


def write_report(run_dir: str | os.PathLike, cfg: dict, records: dict | None = None) -> Path:
    """Write `<run_dir>/report.html` (self-contained) from the run's artefacts and manifest."""
    from pipeline.run.engine import read_manifest

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if records is not None:
        manifest["stages"] = records
    target = Layout(run_dir).report
    atomic_write_text(target, render(run_dir, cfg, manifest))
    return target
