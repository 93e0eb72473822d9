"""`glr run`'s engine: fingerprints, skip / resume, --from / --only / --dry-run.

Stand-in stage actions (small functions writing files) check the skip logic quickly and
exactly; the real stages are in test_stages.py, the config in test_config.py.
"""
from __future__ import annotations


import pytest

from pipeline.run.engine import Stage, execute, read_manifest
from submissions.errors import UserError


def make_stages(calls, cfg):
    """a → b → c, plus d depending on a only; each writes a file from its input and its config."""

    def writer(name, deps):
        def action(ctx):
            calls.append(name)
            text = "".join(ctx.path(f"{d}.txt").read_text() for d in deps) + f"{name}={cfg[name]};"
            ctx.path(f"{name}.txt").write_text(text)
            return {"len": len(text)}
        return action

    graph = {"a": [], "b": ["a"], "c": ["b"], "d": ["a"]}
    return [Stage(n, writer(n, deps), deps=deps, config=cfg[n], outputs=[f"{n}.txt"]) for n, deps in graph.items()]


def run(tmp_path, cfg, calls, **kw):
    lines = []
    m = execute(make_stages(calls, cfg), tmp_path / "run", cfg, echo=lines.append, **kw)
    return m, lines


def test_rerun_skips_everything_and_config_change_redoes_only_dependents(tmp_path):
    cfg, calls = {"a": 1, "b": 1, "c": 1, "d": 1}, []
    m, _ = run(tmp_path, cfg, calls)
    assert calls == ["a", "b", "c", "d"]
    assert all(m["stages"][s]["status"] == "done" for s in "abcd")
    calls.clear()
    run(tmp_path, cfg, calls)
    assert calls == []
    cfg["b"] = 2  # like changing the tuning budget: b and what reads b
    m, lines = run(tmp_path, cfg, calls)
    assert calls == ["b", "c"]
    assert any("b: config changed" in l for l in lines) and any("c: input from b changed" in l for l in lines)
    assert (tmp_path / "run" / "c.txt").read_text() == "a=1;b=2;c=1;"
    assert m["stages"]["b"]["runs"] == 2 and m["stages"]["a"]["runs"] == 1


def test_crash_mid_stage_resumes_at_that_stage(tmp_path):
    cfg, calls = {"a": 1, "b": 1, "c": 1, "d": 1}, []
    stages = make_stages(calls, cfg)
    original = stages[2].action

    def crash(ctx):
        calls.append("c")
        ctx.path("c.txt").write_text("half")
        raise KeyboardInterrupt

    stages[2].action = crash
    with pytest.raises(KeyboardInterrupt):
        execute(stages, tmp_path / "run", cfg, echo=lambda s: None)
    m = read_manifest(tmp_path / "run")
    assert m["stages"]["c"]["status"] == "running" and m["stages"]["b"]["status"] == "done"
    stages[2].action = original
    calls.clear()
    execute(stages, tmp_path / "run", cfg, echo=lambda s: None)
    assert calls == ["c", "d"]


def test_modified_or_missing_output_is_redone(tmp_path):
    cfg, calls = {"a": 1, "b": 1, "c": 1, "d": 1}, []
    run(tmp_path, cfg, calls)
    calls.clear()
    (tmp_path / "run" / "d.txt").write_text("edited by hand")
    (tmp_path / "run" / "c.txt").unlink()
    _, lines = run(tmp_path, cfg, calls)
    assert calls == ["c", "d"]
    assert any("output c.txt missing" in l for l in lines) and any("d: output modified" in l for l in lines)


def test_from_only_and_dry_run(tmp_path):
    cfg, calls = {"a": 1, "b": 1, "c": 1, "d": 1}, []
    run(tmp_path, cfg, calls)
    calls.clear()
    run(tmp_path, cfg, calls, from_stage="b")
    assert calls == ["b", "c", "d"]
    calls.clear()
    run(tmp_path, cfg, calls, only="c")
    assert calls == ["c"]
    calls.clear()
    cfg["a"] = 5
    before = (tmp_path / "run" / "manifest.json").read_text()
    _, lines = run(tmp_path, cfg, calls, dry_run=True)
    assert calls == [] and (tmp_path / "run" / "manifest.json").read_text() == before
    text = "\n".join(lines)
    assert "a  run   config changed" in text
    assert "b  run   input from a will be redone" in text and "d  run   input from a will be redone" in text
    with pytest.raises(UserError, match="--only nope: no such stage"):
        run(tmp_path, cfg, calls, only="nope")


def test_only_needs_finished_inputs(tmp_path):
    cfg, calls = {"a": 1, "b": 1, "c": 1, "d": 1}, []
    with pytest.raises(UserError, match="stage b has not finished"):
        run(tmp_path, cfg, calls, only="c")
    assert calls == []


def test_stage_kind_selects_all_of_its_kind(tmp_path):
    calls = []

    def act(name):
        def f(ctx):
            calls.append(name)
            ctx.path(name.replace(":", "_")).write_text(name)
        return f

    stages = [Stage(n, act(n), outputs=[n.replace(":", "_")]) for n in ("data", "train:x", "train:y", "tune")]
    execute(stages, tmp_path, {}, echo=lambda s: None)
    calls.clear()
    execute(stages, tmp_path, {}, only="train", echo=lambda s: None)
    assert calls == ["train:x", "train:y"]


@pytest.mark.parametrize("names", [["notes.txt"], ["photos", "a.csv"], ["submission.csv"]])
def test_a_run_folder_glr_did_not_write_is_refused_untouched(tmp_path, names):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for n in names:
        (run_dir / n).mkdir() if "." not in n else (run_dir / n).write_text("mine")
    before = sorted(p.name for p in run_dir.iterdir())
    calls = []
    with pytest.raises(UserError, match="glr did not write"):
        run(tmp_path, {"a": 1, "b": 1, "c": 1, "d": 1}, calls)
    assert calls == [] and sorted(p.name for p in run_dir.iterdir()) == before
    # an empty folder, or one a run was killed in before its manifest (only the lock), is fine
    empty = tmp_path / "empty" / "run"
    empty.mkdir(parents=True)
    (empty / ".glr-run.lock").write_text("")
    execute(make_stages(calls, {"a": 1, "b": 1, "c": 1, "d": 1}), empty, {}, echo=lambda s: None)
    assert calls == ["a", "b", "c", "d"]
