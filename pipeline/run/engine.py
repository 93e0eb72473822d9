"""`glr run`: the stages of a competitor's day, driven by one config, each skipped when unchanged.

A stage writes its artefacts into the run folder, then its record goes into
`<run>/manifest.json` (atomically): fingerprint = hash of the stage's config slice, the
content digests of the artefacts it reads (its input stages' outputs) and of outside inputs
(the competition's CSVs); plus the digest of what it wrote. On a re-run a stage is skipped
when its fingerprint matches and its artefacts are still there, unchanged. So a run killed in
any stage, re-run, redoes only the unfinished stage and what depends on it, and changing
only the tuning budget redoes only tuning and what follows.

The engine (`execute`) knows nothing about landmarks: `pipeline.run.stages.plan` builds the
real stage graph, `pipeline.run.layout` names the files, `pipeline.run.summary` reads the result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline import package_versions
from pipeline.run.layout import Layout
from submissions.errors import UserError
from submissions.files import atomic_write_json, hash_file_into, sha256_file


@dataclass
class Stage:
    """One step: `action(ctx)` writes `outputs` (paths relative to the run folder) and returns metrics."""

    name: str
    action: Callable[["Context"], dict]
    deps: list[str] = field(default_factory=list)
    config: Any = None
    outputs: list[str] = field(default_factory=list)
    digest: list[str] | None = None  # files/folders hashed as the stage's output (default: outputs)
    external: Callable[[], Any] | None = None  # outside inputs' digest (e.g. the competition's CSVs)

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass
class Context:
    """What an action sees: the run folder, the config, and the finished stages' records."""

    run_dir: Path
    cfg: dict
    records: dict[str, dict]
    resume: bool = False  # the stage was interrupted before with the same config and inputs
    echo: Callable[[str], None] = print
    external: Any = None  # the running stage's outside inputs as digested for its fingerprint (read once)

    @property
    def layout(self) -> Layout:
        return Layout(self.run_dir, (self.cfg.get("submission") or {}).get("file", "submission.csv"))

    def path(self, rel: str) -> Path:
        return self.run_dir / rel

    def metrics(self, stage: str) -> dict:
        return self.records.get(stage, {}).get("metrics", {})


# -- digests ----------------------------------------------------------------------------------

def digest_paths(root: Path, rels: list[str]) -> str | None:
    """Content digest of files / folders (every file inside, by relative path); None if one is missing."""
    h = hashlib.sha256()
    for rel in rels:
        p = root / rel
        if p.is_file():
            h.update(f"F {rel}\n".encode())
            hash_file_into(h, p)
        elif p.is_dir():
            for sub in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                h.update(f"F {sub.relative_to(root)}\n".encode())
                hash_file_into(h, sub)
        else:
            return None
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """Digest of a JSON-able object (a config slice, a stage's inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(*paths: Path) -> dict:
    """Digest of outside files (absent ones as None), for a stage's `external`."""
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            out[str(p)] = sha256_file(p)
        else:
            out[str(p)] = None
    return out


def tree_stat_digest(folder: Path) -> str | None:
    """Digest of every file's (relative path, size, mtime) under `folder` (None if absent).

    Stats, not contents: an image replaced in place changes it, and 1.58M images cost a few
    seconds of `stat`, not hours of reading. Hidden entries (glr's own caches) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    stack = [folder]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
                continue
            try:
                st = e.stat()
            except OSError:  # a dangling link: its absence is part of the state
                h.update(f"{os.path.relpath(e.path, folder)}\0missing\n".encode())
                continue
            h.update(f"{os.path.relpath(e.path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- manifest ---------------------------------------------------------------------------------

def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The run's manifest.json (stage records, plan, config, versions); empty when there is none."""
    path = Layout(Path(run_dir)).manifest
    if not path.exists():
        return {"stages": {}}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable run manifest ({e}); delete it to redo every stage") from None
    data.setdefault("stages", {})
    return data


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(Layout(run_dir).manifest, manifest)


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One `glr run` per run folder; the OS drops the lock when the process dies (kill -9)."""
    import fcntl

    lay = Layout(run_dir)
    if run_dir.is_dir() and not lay.manifest.exists():  # glr deletes and overwrites only what it wrote
        foreign = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
        if foreign:
            raise UserError(f"{run_dir}: exists and holds files glr did not write ({', '.join(foreign[:3])}"
                            f"{', …' if len(foreign) > 3 else ''}); choose another [run] name or root")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(lay.lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another `glr run` is working in this run folder; wait for it or "
                            "use another [run] name") from None
        yield


# -- selection --------------------------------------------------------------------------------

def _select(stages: list[Stage], name: str, option: str) -> list[int]:
    hits = [i for i, s in enumerate(stages) if s.name == name or s.kind == name]
    if not hits:
        names = ", ".join(dict.fromkeys([s.kind for s in stages] + [s.name for s in stages]))
        raise UserError(f"{option} {name}: no such stage; stages: {names}")
    return hits


# -- engine -----------------------------------------------------------------------------------

def _decide(stage: Stage, rec: dict | None, inputs: dict, config_hash: str, external: Any,
            run_dir: Path) -> tuple[bool, str]:
    """(run?, why) for a stage given its previous record and its current inputs."""
    if not rec or rec.get("status") != "done":
        return True, "not finished before" if rec else "never run"
    if rec.get("config_hash") != config_hash:
        return True, "config changed"
    old_inputs = rec.get("inputs", {})
    for dep, d in inputs.items():
        if old_inputs.get(dep) != d:
            return True, f"input from {dep} changed"
    if hash_obj(external) != rec.get("external_hash"):
        return True, "outside input changed (competition files)"
    for rel in stage.outputs:
        if not (run_dir / rel).exists():
            return True, f"output {rel} missing"
    if digest_paths(run_dir, stage.digest if stage.digest is not None else stage.outputs) != rec.get("digest"):
        return True, "output modified since it was written"
    return False, "unchanged"


def _check_order(stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    for s in stages:
        for d in s.deps:
            if d not in names[: names.index(s.name)]:
                raise ValueError(f"stage {s.name} depends on {d}, which does not come before it")


def _selection(stages: list[Stage], from_stage: str | None, only: str | None) -> tuple[set[int], set[int] | None]:
    """(forced, limited): stage indexes to redo, and the only ones to consider (None: all)."""
    if from_stage and only:
        raise UserError("--from and --only cannot be combined")
    if from_stage:
        first = min(_select(stages, from_stage, "--from"))
        forced = set(range(first, len(stages)))
        return forced, forced
    if only:
        forced = set(_select(stages, only, "--only"))
        return forced, forced
    return set(), None


def _keep_unselected(stage: Stage, rec: dict | None, stages: list[Stage], limited: set[int],
                     run_dir: Path) -> str | None:
    """The digest of a stage --from/--only leaves alone; it must be finished when a selected stage needs it."""
    missing = [o for o in stage.outputs if not (run_dir / o).exists()]
    if (not rec or rec.get("status") != "done" or missing) and any(stage.name in stages[j].deps for j in limited):
        raise UserError(f"stage {stage.name} has not finished (needed by the stages you asked for); "
                        "run without --from/--only first")
    return rec.get("digest") if rec else None


def _run_stage(stage: Stage, ctx: Context, manifest: dict, rec: dict | None, config_hash: str, inputs: dict,
               external: Any) -> str | None:
    """Run one stage's action, record it as running then done (atomically); return its outputs' digest."""
    run_dir, records = ctx.run_dir, manifest["stages"]
    records[stage.name] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "config_hash": config_hash, "inputs": inputs, "runs": (rec or {}).get("runs", 0)}
    _write_manifest(run_dir, manifest)
    t0 = time.perf_counter()
    try:
        metrics = stage.action(ctx) or {}
    except UserError as e:  # say which stage, keep the one-line message
        raise UserError(f"stage {stage.name}: {e}") from None
    seconds = time.perf_counter() - t0
    missing = [o for o in stage.outputs if not (run_dir / o).exists()]
    if missing:
        raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
    digest = digest_paths(run_dir, stage.digest if stage.digest is not None else stage.outputs)
    records[stage.name] = {
        "status": "done", "config_hash": config_hash, "inputs": inputs,
        "external_hash": hash_obj(external), "digest": digest,
        "fingerprint": hash_obj([config_hash, inputs, hash_obj(external)]),
        "started": records[stage.name]["started"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(seconds, 3), "runs": (rec or {}).get("runs", 0) + 1, "metrics": metrics,
        "outputs": stage.outputs,
    }
    _write_manifest(run_dir, manifest)
    ctx.echo(f"[done] {stage.name} in {seconds:.1f} s")
    return digest


def plan_lines(run_dir: Path, rows: list[tuple[str, str, str]], *, headers: tuple[str, ...] = (),
               extra: list[tuple[str, ...]] | None = None) -> list[str]:
    """The dry-run plan as text: stage, run/skip/keep, why; then `extra` columns (e.g. costs) under `headers`."""
    width = max((len(n) for n, _, _ in rows), default=0)
    if not headers:
        return [f"plan for {run_dir}:"] + [f"  {name:<{width}}  {what:<4}  {why}" for name, what, why in rows]
    table = [(name, what, why, *cells) for (name, what, why), cells in zip(rows, extra or [])]
    head = ("stage", "", "why", *headers)
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    widths[1] = 4

    def line(r: tuple) -> str:
        left = f"  {r[0]:<{widths[0]}}  {r[1]:<4}  {r[2]:<{widths[2]}}"
        return left + "".join(f"  {c:>{w}}" for c, w in zip(r[3:], widths[3:]))
    return [f"plan for {run_dir}:", line(head).rstrip()] + [line(r) for r in table]


def _echo_plan(run_dir: Path, rows: list[tuple[str, str, str]], echo: Callable[[str], None]) -> None:
    for text in plan_lines(run_dir, rows):
        echo(text)


def execute(stages: list[Stage], run_dir: str | os.PathLike, cfg: dict | None = None, *,
            from_stage: str | None = None, only: str | None = None, dry_run: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """Run `stages` in order into `run_dir`, skipping those whose fingerprint is unchanged.

    `from_stage`: that stage and all after it are redone; earlier ones are used as they are.
    `only`: just that stage is redone. `dry_run`: print the plan (run/skip and why), run nothing.
    Returns the manifest.
    """
    run_dir = Path(run_dir)
    _check_order(stages)
    forced, limited = _selection(stages, from_stage, only)
    lock = contextlib.nullcontext() if dry_run else _run_lock(run_dir)
    with lock:
        manifest = read_manifest(run_dir)
        records: dict[str, dict] = manifest["stages"]
        manifest.update(plan=[s.name for s in stages], versions=_versions())
        if cfg is not None:
            manifest["config"] = cfg
        ctx = Context(run_dir, cfg or {}, records, echo=echo)
        will_run: set[str] = set()
        current: dict[str, str | None] = {}  # stage -> digest of its outputs now
        plan_rows = []
        for i, stage in enumerate(stages):
            rec = records.get(stage.name)
            if limited is not None and i not in limited:
                current[stage.name] = _keep_unselected(stage, rec, stages, limited, run_dir)
                plan_rows.append((stage.name, "keep", "not selected"))
                continue
            pending = [d for d in stage.deps if d in will_run]
            if dry_run and pending:
                will_run.add(stage.name)
                plan_rows.append((stage.name, "run", f"input from {pending[0]} will be redone"))
                continue
            config_hash = hash_obj(stage.config)
            inputs = {d: current.get(d) for d in stage.deps}
            external = stage.external() if stage.external else None
            if i in forced:
                run, why = True, f"forced by {'--only' if only else '--from'}"
            else:
                run, why = _decide(stage, rec, inputs, config_hash, external, run_dir)
            plan_rows.append((stage.name, "run" if run else "skip", why))
            if dry_run or not run:
                if run:
                    will_run.add(stage.name)
                else:
                    current[stage.name] = rec.get("digest")
                    if not dry_run:
                        echo(f"[skip] {stage.name}: {why}")
                continue
            echo(f"[run ] {stage.name}: {why}")
            ctx.resume = bool(rec and rec.get("status") == "running" and rec.get("config_hash") == config_hash
                              and rec.get("inputs") == inputs and i not in forced)
            ctx.external = external
            current[stage.name] = _run_stage(stage, ctx, manifest, rec, config_hash, inputs, external)
        if dry_run:
            _echo_plan(run_dir, plan_rows, echo)
        manifest["last_plan"] = [{"stage": n, "action": a, "why": w} for n, a, w in plan_rows]
        if not dry_run:
            _write_manifest(run_dir, manifest)
    return manifest


def _versions() -> dict:
    return package_versions("glr", "tensorflow", "keras", "numpy", "pandas", "optuna", "opencv-python-headless",
                            "kaggle")
