"""`glr`: the one place that wires submissions, tuning and pipeline into commands.

Commands are thin: parse, call one function, print. Heavy libraries (pandas, TensorFlow,
OpenCV, Optuna) are imported inside the commands so `glr --help` starts instantly.
Errors a user can fix are `UserError`s: printed as one line, exit status 1, no traceback.
"""
from __future__ import annotations

import json
import signal
import sys

import click

from pipeline.options import (BACKBONES, DATA, ENSEMBLE, EXTRACTOR_KEYS, KNN, MATCH_KEYS, PREDICT, RUN, SEARCH_KEYS,
                              TRAIN, TUNE, VERIFY, click_option, click_options)
from submissions.errors import UserError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from pipeline.progress import set_quiet

        set_quiet(True)
    return value


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
    help="No progress bars (they are also off when stderr is not a terminal).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


class Output(click.Path):
    """A path a command writes: checked writable while the command line is read, before any work starts."""

    def __init__(self, folder: bool = False):
        super().__init__(file_okay=not folder, dir_okay=folder)
        self.folder = folder

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        from submissions.files import check_writable

        check_writable(value, folder=self.folder, what=param.opts[0] if param and param.opts[0].startswith("-")
                       else None)
        return value


def echo_json(obj: dict) -> None:
    """Print one JSON object on stdout (numpy scalars and paths allowed)."""
    from submissions.files import json_default

    click.echo(json.dumps(obj, default=json_default, indent=None))


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="glr")
def cli() -> None:
    """glr: from Kaggle's Google Landmark Recognition files to a validated submission.

    \b
    Quick start (synthetic mini-competition, no downloads):
      glr demo --out demo
    Real competition:
      glr fetch landmark-recognition-2021 --data-dir data
      glr run glr.toml            (see `glr config-example`)
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: every `finally` runs, so temp files go with the process."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main() -> None:
    """Console-script entry point: user errors become one line and exit status 1; SIGTERM cleans up."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as e:  # click's wrapper of KeyboardInterrupt (and of our SIGTERM)
        if isinstance(e.__context__, Terminated):
            click.echo("Terminated; finished work is kept, re-run to resume.", err=True)
            sys.exit(143)
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as e:
        click.echo(f"{'Terminated' if isinstance(e, Terminated) else 'Interrupted'}; finished work is kept, "
                   "re-run to resume.", err=True)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as e:
        if not e.filename:  # not about a path the user gave or glr writes: a bug, keep its traceback
            raise
        click.echo(f"Error: {e.filename}: {e.strerror or e}; check the path and its permissions", err=True)
        sys.exit(1)


# ----------------------------------------------------------------------------------------
# Commands by stage; keep them thin and their imports inside them.
# ----------------------------------------------------------------------------------------

# --- contract & synthetic data: gap, synth -------------------------------------

@cli.command("gap")
@click.argument("submission", type=click.Path(dir_okay=False))
@click.argument("solution", type=click.Path(dir_okay=False))
@click.option("--usage", type=click.Choice(["Public", "Private", "all"], case_sensitive=False), default="all",
              show_default=True, help="Score the Public rows, the Private rows, or both (Ignored rows never count).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Query resamples for a 95% confidence interval of GAP (0 = none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--compare", type=click.Path(dir_okay=False), default=None,
              help="A baseline submission: paired bootstrap of SUBMISSION against it (is it really better?).")
@json_option
def gap_command(submission: str, solution: str, usage: str, bootstrap: int, seed: int, compare: str | None,
                as_json: bool) -> None:
    """Score a submission file against solution.csv: GAP, top-1 accuracy, counts.

    GAP is the competitions' metric (one prediction per query, by confidence; equal confidences by
    id). With --compare, both files are scored on the same resamples of the queries (--bootstrap N,
    1000 by default); p is the share of resamples in which SUBMISSION does not beat the baseline.

    \b
    Example:
      glr gap submission.csv data/solution.csv --usage Private --bootstrap 1000
      glr gap rescored.csv data/solution.csv --compare submission.csv --json
    """
    from submissions.metric import gap_report

    report = gap_report(submission, solution, usage=usage, bootstrap=bootstrap, seed=seed, compare=compare)
    if report["n_predicted"] == 0 and report["n_ignored_predictions"] > 0:
        click.echo(f"Warning: none of the {report['n_ignored_predictions']} predictions is on a scored id of "
                   f"{solution} (usage {report['usage']}): wrong solution file?", err=True)
    if as_json:
        echo_json(report)
        return
    line = f"GAP ({report['usage']}): {report['gap']:.6f}"
    if "gap_ci" in report:
        lo, hi = report["gap_ci"]
        line += f"  [95% CI {lo:.6f} – {hi:.6f}, {report['bootstrap']} resamples]"
    click.echo(line)
    click.echo(f"accuracy: {report['accuracy']:.6f} ({report['n_correct']} correct / {report['n_landmark_queries']} landmark queries)")
    click.echo(
        f"queries: {report['n_queries']} scored, {report['n_landmark_queries']} with a landmark, "
        f"{report['n_predicted']} predicted"
        + (f"; {report['n_ignored_predictions']} prediction(s) on ids outside the scored rows"
           if report["n_ignored_predictions"] else "")
    )
    if "compare" in report:
        c = report["compare"]
        lo, hi = c["delta_ci"]
        click.echo(
            f"vs {c['baseline']}: GAP {c['gap_a']:.6f} → {c['gap_b']:.6f}, delta {c['delta']:+.6f} "
            f"[95% CI {lo:+.6f} – {hi:+.6f}], p = {c['p_value']:.4f} ({c['n_resamples']} paired resamples)"
        )


@cli.command("synth")
@click.argument("out", type=Output(folder=True))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Everything follows from it: the same seed gives the same bytes.")
@click.option("--landmarks", type=click.IntRange(1, 200_000), default=20, show_default=True,
              help="Number of landmark classes (in confusable groups of 2–3 and singletons).")
@click.option("--per-landmark", type=click.IntRange(min=1), default=30, show_default=True,
              help="Train photos per landmark.")
@click.option("--test", "test", type=click.IntRange(min=0), default=200, show_default=True,
              help="Test images (landmark queries + distractors).")
@click.option("--distractor-frac", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Share of the test images that show no training landmark.")
@click.option("--size", type=click.IntRange(32, 1024), default=96, show_default=True,
              help="Side of every image in pixels.")
@click.option("--public-frac", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of test rows marked Usage=Public in solution.csv.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT (only once the new one is complete).")
@quiet_option
@json_option
def synth_command(out: str, seed: int, landmarks: int, per_landmark: int, test: int, distractor_frac: float,
                  size: int, public_frac: float, overwrite: bool, as_json: bool) -> None:
    """Generate a synthetic mini-competition in OUT.

    Kaggle's 2021 layout with ground truth (solution.csv). Landmarks are procedurally drawn
    façades; every photo is a new view (perspective, crop, rotation, lighting, blur, noise,
    occluders). Some landmarks are confusable (shared palette and
    structure, different details); test queries are new views plus non-landmark distractors.
    Writes train.csv, train/, test/, sample_submission.csv, solution.csv and synth.json.

    \b
    Example:
      glr synth data/synth
      glr synth data/big --landmarks 100 --per-landmark 40 --test 2000 --size 128 --seed 7
      glr gap data/synth/sample_submission.csv data/synth/solution.csv   # GAP 0
    """
    from pipeline.acquire.synth import make_competition

    summary = make_competition(out, seed=seed, landmarks=landmarks, per_landmark=per_landmark, test=test,
                               distractor_frac=distractor_frac, size=size, public_frac=public_frac,
                               overwrite=overwrite)
    if as_json:
        echo_json(summary)
        return
    click.echo(
        f"{summary['path']}: {summary['landmarks']} landmarks × {summary['per_landmark']} = "
        f"{summary['train_images']} train images; {summary['test_images']} test images "
        f"({summary['landmark_queries']} landmark queries, {summary['distractors']} distractors; "
        f"{summary['public']} Public / {summary['private']} Private); {summary['size']} px; "
        f"{len(summary['confusable_groups'])} confusable groups"
    )



# --- Kaggle side: fetch, fetch-urls, clean, submit -----------------------------

def _echo_summary(summary: dict | None) -> None:
    if summary:
        click.echo(
            f"{summary['root']}: {summary['train_images']} train images, {summary['classes']} classes, "
            f"{summary['test_images']} test images"
        )


@cli.command("fetch")
@click.argument("competition")
@click.option("--data-dir", required=True, type=Output(folder=True), help="Where the competition's files go.")
@click.option("--files", default=None, metavar="A,B,…",
              help="Fetch only these files (comma-separated, e.g. train.csv,sample_submission.csv).")
@click.option("--force", is_flag=True, help="Download again even if the files are already there.")
@quiet_option
@json_option
def fetch_cmd(competition: str, data_dir: str, files: str | None, force: bool, as_json: bool) -> None:
    """Download a competition's files with the official kaggle client and extract them safely.

    Credentials: ~/.kaggle/kaggle.json, or KAGGLE_USERNAME + KAGGLE_KEY, or KAGGLE_API_TOKEN.
    An interrupted download resumes from the bytes on disk; a re-run skips what is complete.
    Archive members that would land outside DATA_DIR (../, absolute, symlinks) are refused.

    \b
    Example:
      glr fetch landmark-recognition-2021 --data-dir data/glr2021
      glr fetch landmark-recognition-2019 --data-dir data/glr2019 --files train.csv,test.csv
    """
    from pipeline.acquire.kaggle import fetch

    out = fetch(competition, data_dir, files=files.split(",") if files else None, force=force)
    if as_json:
        echo_json(out)
        return
    if out["downloaded"]:
        click.echo(f"downloaded {', '.join(out['downloaded'])}" + (f"; extracted {out['extracted']} files" if out["extracted"] else ""))
    if out["skipped"]:
        click.echo(f"already complete: {', '.join(out['skipped'])} (use --force to download again)")
    _echo_summary(out["summary"])


@cli.command("fetch-urls")
@click.argument("csv", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=Output(folder=True), help="Image folder (hashed layout a/b/c/<id>.jpg).")
@click.option("--size", default=96, show_default=True, type=click.IntRange(min=0),
              help="Longest side in pixels (asked of Google's servers, else resized here); 0 = original.")
@click.option("--workers", default=16, show_default=True, type=click.IntRange(1, 256), help="Parallel downloads.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds allowed to connect, to each read, and to each whole image answer.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Retries of a timed-out / refused / 5xx request, with back-off.")
@quiet_option
@json_option
def fetch_urls_cmd(csv: str, out: str, size: int, workers: int, timeout: float, retries: int, as_json: bool) -> None:
    """Download the images of an id,url[,landmark_id] list (2018/2019 competitions).

    Resumable (images already there are skipped), written atomically, failures listed in
    OUT/failed.csv (id,url,reason) instead of skipped silently.

    \b
    Example:
      glr fetch-urls data/glr2019/train.csv --out data/glr2019/train --size 256 --workers 32
    """
    from pipeline.acquire.urls import fetch_urls

    res = fetch_urls(csv, out, size=size, workers=workers, timeout=timeout, retries=retries)
    if as_json:
        echo_json(res)
        return
    click.echo(
        f"{res['downloaded']} downloaded, {res['skipped']} already there, {res['failed']} failed "
        f"({res['images_per_s']:.1f} images/s)" + (f"; failures listed in {res['failed_csv']}" if res["failed"] else "")
    )


@cli.command("fetch-gldv2")
@click.argument("data_dir", type=Output(folder=True))
@click.option("--split", type=click.Choice(["train", "index", "test"]), default="train", show_default=True,
              help="Which set of the mirror's tar shards (train 500, index 100, test 20).")
@click.option("--shards", default=None, metavar="0-49,…", help="Only these shards (inclusive ranges); default all.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64), help="Shards downloaded at once.")
@click.option("--resize", default=0, show_default=True, type=click.IntRange(min=0),
              help="Re-encode each image to this longer side on extraction (0 = as published).")
@click.option("--clean-only", is_flag=True, help="Keep only the train images listed in train_clean.csv.")
@click.option("--keep-tars", is_flag=True, help="Keep each tar after its verified extraction.")
@click.option("--mirror", default="https://s3.amazonaws.com/google-landmark", show_default=True,
              help="Base URL of the GLDv2 mirror.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds allowed to connect and to each read.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Retries of a request that brought no bytes, with back-off (a cut resumes and is not counted).")
@quiet_option
@json_option
def fetch_gldv2_cmd(data_dir: str, split: str, shards: str | None, workers: int, resize: int, clean_only: bool,
                    keep_tars: bool, mirror: str, timeout: float, retries: int, as_json: bool) -> None:
    """Download GLDv2 from its mirror into a landmark-recognition-2019 folder (resumable, md5-verified).

    Each tar resumes with HTTP Range after a cut, is checked against the published md5 (a mismatch is
    downloaded again, then listed in DATA_DIR/<split>/failed.csv), and extracted member by member
    with the refusals of `glr fetch`. Finished shards are recorded: a re-run downloads nothing twice.
    The folder gets train.csv, sample_submission.csv and solution.csv (the real 2019 Public/Private
    labels), so `glr gap` gives a 2019 submission's private GAP.

    \b
    Example:
      glr fetch-gldv2 data/glr2019 --split train --shards 0-49 --resize 256 --clean-only
      glr fetch-gldv2 data/glr2019 --split test
    """
    from pipeline.acquire.gldv2 import fetch_gldv2

    res = fetch_gldv2(data_dir, split=split, shards=shards, workers=workers, resize=resize, clean_only=clean_only,
                      keep_tars=keep_tars, mirror=mirror, timeout=timeout, retries=retries)
    if as_json:
        echo_json(res)
    else:
        click.echo(f"{split}: {res['fetched']} shard(s) fetched, {res['skipped']} already done, {res['failed']} failed; "
                   f"{res['images_extracted']} images extracted ({res['mb_per_s']:.1f} MB/s); "
                   f"wrote {', '.join(res['folder']['wrote']) or 'nothing'}")
    if res["failed"]:
        raise UserError(f"{res['failed']} of {res['shards']} shard(s) failed (reasons in {res['failed_csv']}); "
                        "re-run the same command to retry them")


@cli.command("clean")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--quarantine", default=None, type=click.Path(file_okay=False),
              help="Where unusable images are moved (default: DATA_DIR-quarantine beside it).")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64), help="Parallel checks.")
@quiet_option
@json_option
def clean_cmd(data_dir: str, quarantine: str | None, workers: int, as_json: bool) -> None:
    """Move unusable images (empty, truncated, not an image, bomb-sized, unsupported mode) to quarantine.

    Nothing is deleted; QUARANTINE/report.csv says why each file was moved. Odd but usable
    images (palette+transparency, CMYK, 16-bit, grayscale, EXIF-rotated) stay in place.

    \b
    Example:
      glr clean data/glr2019/train --quarantine data/glr2019/quarantine
    """
    from pipeline.acquire.clean import clean

    res = clean(data_dir, quarantine=quarantine, workers=workers)
    if as_json:
        echo_json(res)
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(res["reasons"].items()))
    click.echo(f"{res['checked']} images checked, {res['quarantined']} quarantined" + (f" ({reasons})" if reasons else ""))
    if res["quarantined"]:
        click.echo(f"report: {res['report']}")


@cli.command("submit")
@click.argument("submission", type=click.Path(dir_okay=False), required=False)
@click.option("--competition", "-c", required=True, help="Kaggle's name, e.g. landmark-recognition-2019.")
@click.option("--message", "-m", required=True, help="Description shown on Kaggle.")
@click.option("--data-dir", default=None, type=click.Path(),
              help="Competition directory (or its sample_submission.csv): the ids are checked against it.")
@click.option("--no-id-check", is_flag=True, help="Upload without --data-dir, its ids unchecked (not advised).")
@click.option("--kernel", default=None, metavar="USER/SLUG",
              help="Code competitions (2020, 2021): submit this notebook's submission.csv instead of a file.")
@click.option("--version", "kernel_version", type=click.IntRange(min=1), default=None,
              help="With --kernel: the notebook version [default: the latest].")
@json_option
def submit_cmd(submission: str | None, competition: str, message: str, data_dir: str | None, no_id_check: bool,
               kernel: str | None, kernel_version: int | None, as_json: bool) -> None:
    """Validate a submission file, then upload it to Kaggle with the official client.

    An invalid file is never uploaded: its rows are held to the format's one grammar and its ids
    to the competition's sample_submission.csv (--data-dir; without it, only with --no-id-check).
    The 2020/2021 competitions take submissions only from Kaggle notebooks: build one with
    `glr bundle` + `glr notebook --push --wait`, then submit it with --kernel.

    \b
    Example:
      glr submit submission.csv -c landmark-recognition-2019 -m "vgg16 + rescoring" --data-dir data/glr2019
      glr submit --kernel alice/glr-landmark-recognition-2021 -c landmark-recognition-2021 -m "vgg16"
    """
    from pipeline.acquire.kaggle import submit, submit_kernel

    if kernel:
        if submission:
            raise UserError("give either a SUBMISSION file or --kernel USER/SLUG, not both")
        res = submit_kernel(kernel, competition, message, version=kernel_version)
        if as_json:
            echo_json(res)
            return
        click.echo(f"{res['message'] or 'submitted'} (ref {res['ref']}); status: {res['url']}")
        return
    if not submission:
        raise UserError("give the SUBMISSION file to upload (or --kernel USER/SLUG for a code competition)")
    if kernel_version:
        raise UserError("--version goes with --kernel USER/SLUG")
    res = submit(submission, competition, message, data_dir=data_dir, check_ids=not no_id_check)
    if as_json:
        echo_json(res)
        return
    click.echo(f"{res['message'] or 'submitted'} (ref {res['ref']}); status: {res['url']}")



# --- code competitions: bundle, notebook -----------------------------------------

@cli.command("bundle")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=Output(folder=True), help="The bundle folder to write.")
@click.option("--dataset", required=True, metavar="USER/SLUG", help="The Kaggle dataset it becomes.")
@click.option("--title", default=None, help="Dataset title (6-50 characters) [default: glr SLUG].")
@click.option("--include-wheel", multiple=True, metavar="NAME",
              help="Also bundle this dependency's wheel (pip download; a package the Kaggle image lacks).")
@click.option("--exclude-wheel", multiple=True, metavar="NAME", help="Leave this wheel out (repeatable).")
@click.option("--upload", is_flag=True, help="Upload it: a new private dataset, or a new version of it.")
@click.option("--notes", default="glr bundle", show_default=True, help="With --upload: the version notes.")
@json_option
def bundle_cmd(run: str, out: str, dataset: str, title: str | None, include_wheel: tuple[str, ...],
               exclude_wheel: tuple[str, ...], upload: bool, notes: str, as_json: bool) -> None:
    """Copy a finished run's final models, policy and config, with glr's wheel, into a Kaggle dataset folder.

    Exactly what `glr infer` reads, at the same paths (so `glr infer OUT --data-dir …` works), plus
    wheels/, dataset-metadata.json and glr-bundle.json (sizes and sha256). Refuses a bundle over
    Kaggle's dataset limits, with the reason.

    \b
    Example:
      glr bundle runs/glr2021 --out bundles/glr2021 --dataset alice/glr-2021-bundle --upload
    """
    from pipeline.run.bundle import build_bundle

    res = build_bundle(run, out, dataset, title=title, include_wheels=include_wheel, exclude_wheels=exclude_wheel,
                       echo=lambda m: click.echo(m, err=True))
    if upload:
        from pipeline.acquire.kaggle import upload_dataset

        res["upload"] = upload_dataset(out, notes=notes)
    if as_json:
        echo_json(res)
        return
    click.echo(f"{res['out']}: {res['files']} files, {res['bytes'] / 2**20:.1f} MiB; wheels: {', '.join(res['wheels'])}")
    if upload:
        up = res["upload"]
        click.echo(f"{'created' if up['created'] else 'new version of'} dataset {up['dataset']}: {up['url']}")


@cli.command("notebook")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("--competition", "-c", required=True, help="Kaggle's name, e.g. landmark-recognition-2021.")
@click.option("--dataset", required=True, metavar="USER/SLUG", help="The bundle's dataset (`glr bundle --dataset`).")
@click.option("--out", required=True, type=Output(folder=True), help="The kernel folder to write.")
@click.option("--kernel", default=None, metavar="USER/SLUG", help="The notebook's id [default: USER/glr-COMPETITION].")
@click.option("--gpu/--cpu", default=None, help="Ask Kaggle for a GPU [default: from the run's precision].")
@click.option("--expect-test", type=click.IntRange(min=1), default=None, metavar="N",
              help="Passed to the notebook's `glr infer` (test images to project the time for).")
@click.option("--time-limit", "time_limit_h", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="HOURS", help="Passed to the notebook's `glr infer` [default: infer's, 12 h].")
@click.option("--push", is_flag=True, help="Push it (kernels push): Kaggle saves a new version and runs it.")
@click.option("--wait", is_flag=True, help="With --push: poll until the run completes; show the log tail on error.")
@click.option("--poll", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="With --wait: seconds between status checks.")
@json_option
def notebook_cmd(run: str, competition: str, dataset: str, out: str, kernel: str | None, gpu: bool | None,
                 expect_test: int | None, time_limit_h: float | None, push: bool, wait: bool, poll: float,
                 as_json: bool) -> None:
    """Write the Kaggle notebook (+ kernel-metadata.json) that runs `glr infer` on the bundle, offline.

    The notebook installs glr from the bundle's wheels with no index, prints versions and the
    accelerator, and writes submission.csv to the working folder. Internet off, private, the
    competition and the dataset attached. Then submit it: `glr submit --kernel USER/SLUG -c C -m MSG`.

    \b
    Example:
      glr notebook runs/glr2021 -c landmark-recognition-2021 --dataset alice/glr-2021-bundle \\
          --out kernels/glr2021 --push --wait
    """
    from pipeline.acquire.notebook import write_notebook

    if wait and not push:
        raise UserError("--wait goes with --push")
    res = write_notebook(run, competition, dataset, out, kernel=kernel, gpu=gpu, expect_test=expect_test,
                         time_limit_h=time_limit_h)
    if push:
        from pipeline.acquire.kaggle import push_kernel, wait_kernel

        res["push"] = push_kernel(out)
        click.echo(f"pushed {res['push']['kernel']} version {res['push']['version']}: {res['push']['url']}", err=True)
        if wait:
            res["wait"] = wait_kernel(res["kernel"], version=res["push"]["version"], poll_s=poll,
                                      echo=lambda m: click.echo(m, err=True))
    if as_json:
        echo_json(res)
        return
    click.echo(f"{res['notebook']} ({'GPU' if res['enable_gpu'] else 'CPU'}, internet off); kernel {res['kernel']}")
    if push and wait:
        click.echo(f"complete; submit it: glr submit --kernel {res['kernel']} --version {res['push']['version']} "
                   f"-c {competition} -m MESSAGE")


# --- models: train, predict, ensemble, evaluate --------------------------------

def _warnings_to_stderr() -> None:
    """Show our warnings (skipped images) as one plain line each on stderr."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"Warning: {message}", err=True)

    warnings.showwarning = show


@cli.command("train")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--backbone", type=click.Choice(BACKBONES), required=True,
              help="ImageNet backbone (keras.applications) with its conventional head.")
@click.option("--out", required=True, type=Output(folder=True), help="Run directory, e.g. runs/vgg16.")
@click_options(TRAIN)
@click_option(RUN["cache_dir"])
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last finished epoch.")
@quiet_option
@json_option
def train_command(data_dir: str, as_json: bool, **options) -> None:
    """Train a transfer-learning classifier (two phases, resumable) into a run directory.

    Phase 1 trains the new head on the frozen base (on cached bottleneck features by default);
    phase 2 fine-tunes the top layers with augmentation at a lower learning rate. Early stopping
    on validation loss keeps the best model. The run directory holds model.keras, labels.json,
    split.csv, history.json, manifest.json and training_curve.png. Corrupt images are skipped
    with a warning and counted in the manifest. Decoded images and base features go to the
    competition's shared cache (--cache-dir, default DATA_DIR/.glr-cache; see `glr cache`).

    \b
    Example:
      glr train data --backbone vgg16 --out runs/vgg16 --weights none --epochs 10
      glr train data --backbone vgg16 --out runs/vgg16 --weights none --epochs 10 --resume
    """
    from pipeline.model.train import train

    _warnings_to_stderr()
    m = train(data_dir, **options)
    if as_json:
        echo_json({"out": options["out"], "best": m["best"], "final": m["final"], "precision": m["precision"],
                   "timings": m["timings"], "skipped_images": m["data"]["skipped_images"],
                   "caches": m.get("caches")})
        return
    best = m["best"]
    click.echo(f"{options['out']}: {m['backbone']} on {m['n_classes']} classes, {m['data']['train_images']} train / "
               f"{m['data']['val_images']} val images, precision {m['precision']}")
    click.echo(f"best {best.get('phase')} epoch {best.get('epoch')}: monitored loss {best.get('value'):.4f}; "
               f"last epoch val_accuracy {m['final'].get('val_accuracy')}")
    if m["data"]["skipped_images"]:
        click.echo(f"skipped {m['data']['skipped_images']} unreadable image(s) (listed in manifest.json)")


@cli.command("predict")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Competition directory.")
@click.option("--split", type=click.Choice(["test", "train", "val"]), default="test", show_default=True,
              help="Images to predict; val = the run's stored validation split.")
@click.option("--out", required=True, type=Output(), help="Predictions table (Parquet).")
@click.option("--embeddings", type=Output(), default=None,
              help="Also save the penultimate-layer descriptors here (.npy, ids in .ids.txt beside it).")
@click_options(PREDICT)
@quiet_option
@json_option
def predict_command(run_dir: str, as_json: bool, **options) -> None:
    """Predict the top-k landmarks of every image of a split with a trained run.

    \b
    Example:
      glr predict runs/vgg16 --data-dir data --out preds/vgg16.parquet --top-k 5
      glr predict runs/vgg16 --data-dir data --split val --out val.parquet --embeddings val.npy
    """
    from pipeline.model.predict import predict

    _warnings_to_stderr()
    info = predict(run_dir, options.pop("data_dir"), **options).stats()
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{options['out']}: {info['predicted']} of {info['images']} images, top-{options['top_k']}, "
                   f"{info['images_per_s']} images/s ({info['precision']})")


@cli.command("embed")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Competition directory.")
@click.option("--split", type=click.Choice(["train", "test", "val"]), default="train", show_default=True,
              help="Images to embed; val = the run's stored validation split.")
@click.option("--images", type=click.Path(file_okay=False), default=None,
              help="Instead of --data-dir: every image under this folder (e.g. non-landmark photos for "
                   "`glr nonlandmark`); ids are paths relative to it without the extension.")
@click.option("--out", required=True, type=Output(), help="Embeddings (.npy; ids in .ids.txt beside it).")
@click.option("--float16", is_flag=True, help="Store the rows as float16 (half the disk; ~1e-3 per component).")
@click_options(PREDICT, ("batch_size", "precision"))
@quiet_option
@json_option
def embed_command(run_dir: str, as_json: bool, **options) -> None:
    """Embed every image of a split, or of a folder (L2-normalised rows, streamed to a memory-mapped .npy).

    Same files as `glr predict --embeddings`. Progress is kept in OUT.partial/ (committed every
    10 s): rerun the same command after an interruption and it continues where it stopped.

    \b
    Example:
      glr embed runs/arcface --data-dir data --split train --out emb/train.npy --float16
      glr embed runs/arcface --data-dir data --split test --out emb/test.npy
      glr embed runs/arcface --images photos/non-landmarks --out emb/pool.npy
    """
    from pipeline.model.predict import embed

    _warnings_to_stderr()
    info = embed(run_dir, options.pop("data_dir"), **options).stats()
    if as_json:
        echo_json(info)
    else:
        resumed = f", continued after {info['resumed_from']}" if info["resumed_from"] else ""
        click.echo(f"{info['out']}: {info['embedded']} of {info['images']} images, {info['dim']}-D {info['dtype']}"
                   f"{resumed}, {info['images_per_s']} images/s")


@cli.command("knn")
@click.argument("queries", type=click.Path(dir_okay=False))
@click.argument("index", type=click.Path(dir_okay=False))
@click.option("--labels", required=True, type=click.Path(dir_okay=False),
              help="train.csv (id,landmark_id) giving each index row's landmark.")
@click.option("--out", required=True, type=Output(), help="Predictions table (Parquet).")
@click.option("--top-k", type=click.IntRange(min=1), default=PREDICT.default("top_k"), show_default=True,
              help="Classes kept per query.")
@click_options(KNN)
@quiet_option
@json_option
def knn_command(queries: str, index: str, as_json: bool, **options) -> None:
    """Cosine kNN of query embeddings among index embeddings; classes scored from the neighbours.

    QUERIES and INDEX are embeddings files (`glr embed`, `glr predict --embeddings`). The table has
    the predictions contract, so `glr ensemble` averages it with classifier members. The search is
    exact by default; `--search ivf|hnsw` uses a faiss index and prints its recall@k against the
    exact search on `--recall-sample` queries.

    \b
    Example:
      glr knn emb/test.npy emb/train.npy --labels data/train.csv --out preds/knn.parquet --k 20
      glr knn emb/test.npy emb/train.npy --labels data/train.csv --out preds/knn.parquet --search ivf --nprobe 128
    """
    from pipeline.model.knn import knn

    info = knn(queries, index, **options).stats()
    if as_json:
        echo_json(info)
        return
    if info["method"] == "exact":
        click.echo(f"{info['out']}: {info['queries']} queries × {info['index']} index rows ({info['dim']}-D), "
                   f"top-{info['k']} neighbours in {info['seconds']} s ({info['gflops']} GFLOP/s)")
        return
    click.echo(f"{info['out']}: {info['queries']} queries × {info['index']} index rows ({info['dim']}-D), "
               f"top-{info['k']} neighbours ({info['params']}): index built in {info['build_seconds']} s, "
               f"searched in {info['seconds']} s")
    if info["recall_queries"]:
        click.echo(f"recall@{info['k']} vs exact on {info['recall_queries']} sampled queries: {info['recall']:.3f}")


@cli.command("nonlandmark")
@click.argument("queries", type=click.Path(dir_okay=False))
@click.argument("pool", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=Output(), help="Non-landmark table (id, nonlandmark), Parquet.")
@click.option("--k", "k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Signal = mean of the k best similarities to the pool (negatives count 0).")
@click_options(KNN, SEARCH_KEYS)
@quiet_option
@json_option
def nonlandmark_command(queries: str, pool: str, as_json: bool, **options) -> None:
    """Per-query non-landmark signal: similarity of each query to a pool of non-landmark images.

    QUERIES and POOL are embeddings files (`glr embed`). The pool: the local validation's
    held-out-class queries, a folder of non-landmark photos, or the queries themselves (a query's
    own row is skipped, so near-duplicates among the queries count). `glr tune --nonlandmark` then
    searches a demotion by it; `glr rescore --nonlandmark` applies it.

    \b
    Example:
      glr nonlandmark emb/val.npy emb/pool.npy --out nl.val.parquet
      glr nonlandmark emb/test.npy emb/test.npy --out nl.test.parquet --k 2
    """
    from pipeline.model.nonlandmark import nonlandmark

    info = nonlandmark(queries, pool, **options)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {info['out']}: {info['queries']} queries against {info['pool']} pool images "
                   f"(signal median {info['median']}, 90th percentile {info['p90']})")


@cli.command("ensemble")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=Output(), help="Ensembled predictions table.")
@click_options(ENSEMBLE)
def ensemble_command(paths: tuple[str, ...], weights: list[float] | None, out: str, top_k: int) -> None:
    """Weighted average of several models' predictions tables, top-k out.

    A class missing from a model's top-k counts as probability 0 for that model; weights are
    renormalised over the models that predicted each image. Models may know different classes.

    \b
    Example:
      glr ensemble preds/vgg16.parquet preds/vgg19.parquet preds/resnet50.parquet --weights 1,1,2 --out ens.parquet
    """
    from pipeline.model.ensemble import ensemble

    table = ensemble(list(paths), weights=weights, out=out, top_k=top_k)
    click.echo(f"{out}: {table['id'].nunique()} images, top-{top_k}, from {len(paths)} tables")


@cli.command("evaluate")
@click.argument("preds", type=click.Path(dir_okay=False))
@click.option("--solution", required=True, type=click.Path(dir_okay=False), help="solution.csv (id,landmarks,Usage).")
@click.option("--usage", type=click.Choice(["Public", "Private", "all"], case_sensitive=False), default="all",
              show_default=True)
@json_option
def evaluate_command(preds: str, solution: str, usage: str, as_json: bool) -> None:
    """GAP and top-1 accuracy of a predictions table (its top-1 rows are the predictions).

    \b
    Example:
      glr evaluate preds/vgg16.parquet --solution data/solution.csv --json
    """
    from submissions.metric import evaluate_predictions

    r = evaluate_predictions(preds, solution, usage=usage)
    if as_json:
        echo_json(r)
    else:
        click.echo(f"GAP {r['gap']:.4f}  accuracy {r['accuracy']:.4f}  ({r['n_queries']} queries, "
                   f"{r['n_landmark_queries']} with a landmark, {r['n_predicted']} predicted)")



# --- verification: features, verify, merge, match ------------------------------

_extractor_options = click_options(VERIFY, EXTRACTOR_KEYS)  # settings that change features (the cache key)
_match_options = click_options(VERIFY, MATCH_KEYS)  # matching and RANSAC (defaults chosen on real photos)


@cli.command("features")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@_extractor_options
@click.option("--shard", default=None, help="Only shard i of n (i/n, by crc32 of the image id).")
@click_option(RUN["cache_dir"])
@click_options(VERIFY, ("workers",))
@quiet_option
@json_option
def features_cmd(data_dir: str, split: str, as_json: bool, **options) -> None:
    """Extract local features of a split into the cache ahead of `glr verify` (resumable).

    Each image is extracted once per extractor configuration; cached images are skipped.

    \b
    Example:
      glr features data --split train --extractor sift --shard 0/4 --workers 2
    """
    from pipeline.verify.cache import extract_split

    _warnings_to_stderr()
    res = extract_split(data_dir, split, **options)
    if as_json:
        echo_json(res)
    else:
        click.echo(f"{res['split']}: {res['extracted']} extracted, {res['already_cached']} already cached, "
                   f"{res['unreadable']} unreadable, of {res['images']} images → {res['cache']}")


@cli.command("verify")
@click.argument("preds", type=click.Path(dir_okay=False))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Competition directory.")
@click.option("--out", required=True, type=Output(), help="Inliers table to write (Parquet).")
@click_options(VERIFY, ("extractor", "candidates", "k", "refs"))
@click.option("--embeddings", type=click.Path(dir_okay=False), default=None,
              help="Query embeddings (glr predict --split test --embeddings) for --refs nearest.")
@click.option("--ref-embeddings", type=click.Path(dir_okay=False), default=None,
              help="Training-image embeddings (glr predict --split train --embeddings) for --refs nearest.")
@click.option("--shard", default=None, help="Only queries of shard i of n (i/n, crc32 of the id); join with glr merge.")
@click_option(RUN["cache_dir"])
@click_options(VERIFY, ("workers", "max_side", "n_features", "delf_handle", "ratio", "mutual",
                        "model", "method", "threshold", "seed", "chunk_size"))
@quiet_option
@json_option
def verify_cmd(preds: str, as_json: bool, **options) -> None:
    """Count RANSAC inliers between each query and K reference images of its top candidate classes.

    Writes one row per (query, class, reference). Features are extracted once per image
    (cached); an interrupted run resumes where it stopped; re-running onto an existing --out
    made with the same extractor/matching settings computes only the pairs it lacks (other
    settings: all pairs); a missing query image gets 0 inliers and a warning.

    \b
    Example:
      glr verify preds.parquet --data-dir data --out inliers.parquet --candidates 3 --k 3 --workers 2
      glr verify preds.parquet --data-dir data --out part0.parquet --shard 0/2
      glr merge part0.parquet part1.parquet --out inliers.parquet
    """
    import time

    from pipeline.verify.inliers import verify

    _warnings_to_stderr()
    t0 = time.perf_counter()
    res = verify(preds, options.pop("data_dir"), options.pop("out"), **options)
    table = res.table
    info = {"pairs": len(table), "queries": int(table["id"].nunique()),
            "computed_pairs": res.computed_pairs, "reused_pairs": res.reused_pairs,
            "median_inliers": float(table["inliers"].median()) if len(table) else 0.0,
            "seconds": round(time.perf_counter() - t0, 2)}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{info['pairs']} pairs of {info['queries']} queries verified in {info['seconds']} s "
                   f"({info['computed_pairs']} computed, {info['reused_pairs']} reused from an earlier run; "
                   f"median {info['median_inliers']:g} inliers)")


@cli.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=Output(), help="Joined inliers table.")
def merge_cmd(parts: tuple[str, ...], out: str) -> None:
    """Join the inliers tables of `glr verify --shard` runs into one.

    \b
    Example:
      glr merge part0.parquet part1.parquet --out inliers.parquet
    """
    from pipeline.verify.inliers import merge

    table = merge(list(parts), out)
    click.echo(f"{out}: {len(table)} rows from {len(parts)} table(s)")


@cli.command("match")
@click.argument("img_a", type=click.Path(dir_okay=False))
@click.argument("img_b", type=click.Path(dir_okay=False))
@_extractor_options
@_match_options
@click.option("--plot", type=Output(), default=None,
              help="Write a PNG of both images with the inlier matches drawn.")
@json_option
def match_cmd(img_a: str, img_b: str, as_json: bool, **options) -> None:
    """Match one pair of images and print its RANSAC inlier count (debugging verification).

    \b
    Example:
      glr match query.jpg ref.jpg --plot pair.png
      glr match query.jpg ref.jpg --extractor orb --json
    """
    from pipeline.verify.matching import match_pair

    res = match_pair(img_a, img_b, **options)
    if as_json:
        echo_json(res)
    else:
        click.echo(f"{res['inliers']} inliers of {res['tentative_matches']} tentative matches "
                   f"({res['keypoints_a']} / {res['keypoints_b']} keypoints; {res['match_ms']} ms matching)"
                   + (f"; plot: {res['plot']}" if res.get("plot") else ""))



# --- tuning: tune, rescore, write-submission -----------------------------------

@cli.command("tune")
@click.argument("preds", type=click.Path(dir_okay=False))
@click.argument("inliers", type=click.Path(dir_okay=False))
@click.option("--solution", required=True, type=click.Path(dir_okay=False),
              help="Ground truth of the validation queries (id,landmarks,Usage).")
@click.option("--out", required=True, type=Output(), help="Policy JSON to write (plots go beside it).")
@click_options(TUNE)
@click.option("--nonlandmark", type=click.Path(dir_okay=False), default=None,
              help="Non-landmark signal of the validation queries (`glr nonlandmark`): also search its demotion.")
@quiet_option
@json_option
def tune_command(preds: str, inliers: str, solution: str, out: str, as_json: bool, **options) -> None:
    """Choose a rescoring policy on GAP with Optuna (TPE) and write it as JSON.

    The study maximises GAP on the tuning part of the validation queries; the held-out part
    (--holdout) is never seen by it. Prints GAP before -> after on both parts with 95% bootstrap
    intervals and whether the held-out gain is beyond noise; refuses to write a policy that loses
    on the held-out part unless --force. Interrupted? Re-run the same command: the study resumes
    from its storage. Several processes or machines share one study through --storage (a journal
    file on a shared disk, or PostgreSQL) and the same --study name; trials of dead workers are
    retried. Reproducible: with --jobs 1 and no --timeout, the same inputs and --seed on a fresh
    study give the same policy and GAPs every time; --jobs > 1, --timeout, a shared --storage or
    a resumed study depend on timing and may choose a (slightly) different policy.

    \b
    Example:
      glr tune val.parquet inliers.val.parquet --solution solution.csv --out tune/policy.json --trials 300
      glr tune val.parquet inliers.val.parquet --solution solution.csv --out tune/policy.json --jobs 2
      glr tune val.parquet inliers.val.parquet --solution solution.csv --out seed.json --policy seed-rules
      glr tune ... --storage postgresql://glr@db/optuna --study gldv2-run1   (on every machine)
    """
    from pipeline.progress import enabled
    from tuning.search import PolicyRejected, summary_lines, tune

    result = tune(preds, inliers, solution, out, **options, progress=enabled())
    if not result["written"]:  # lost on the held-out part, no --force: one line, exit 1
        raise PolicyRejected(result["message"])
    if as_json:
        echo_json(result)
        return
    for line in summary_lines(result):
        click.echo(line, err=line.startswith("WARNING"))
    click.echo("wrote " + ", ".join(result["written"]))


@cli.command("rescore")
@click.argument("preds", type=click.Path(dir_okay=False))
@click.argument("inliers", type=click.Path(dir_okay=False))
@click.option("--policy", "policy", required=True,
              help="Policy JSON from `glr tune`, or a preset: identity, seed-rules.")
@click.option("--out", required=True, type=Output(), help="Rescored predictions table (Parquet).")
@click.option("--nonlandmark", type=click.Path(dir_okay=False), default=None,
              help="Non-landmark signal of these queries (`glr nonlandmark`); needed by a policy with that term.")
@json_option
def rescore_command(preds: str, inliers: str, policy: str, out: str, as_json: bool,
                    nonlandmark: str | None) -> None:
    """Apply a rescoring policy to a predictions table, writing a predictions table.

    Rank 0 of each id becomes the policy's prediction with its new confidence as score (other
    candidates follow with their scores); `glr write-submission` turns it into a submission.

    \b
    Example:
      glr rescore test.parquet inliers.test.parquet --policy tune/policy.json --out rescored.parquet
    """
    from submissions.tables import write_predictions
    from tuning.policy import rescore

    df = rescore(preds, inliers, policy, nonlandmark)
    write_predictions(df, out)
    top = df[df["rank"] == 0]
    info = {"path": out, "queries": int(len(top)), "rows": int(len(df))}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {out}: {info['queries']} queries, {info['rows']} rows")


@cli.command("write-submission")
@click.argument("preds", type=click.Path(dir_okay=False))
@click.option("--data-dir", required=True, type=click.Path(exists=True),
              help="Competition directory holding sample_submission.csv (or that file itself).")
@click.option("--out", required=True, type=Output(), help="Submission CSV to write (id,landmarks).")
@json_option
def write_submission_command(preds: str, data_dir: str, out: str, as_json: bool) -> None:
    """Write the id,landmarks submission from a predictions table (rank 0 of each id).

    Exactly the ids of the competition's sample_submission.csv, in its order; ids without a
    prediction are written empty. The file is checked (the format's grammar, the sample's ids)
    before it replaces --out: a failed check leaves the previous file as it was.

    \b
    Example:
      glr write-submission rescored.parquet --data-dir data/landmark-recognition-2021 --out submission.csv
    """
    from submissions.format import write_submission_file

    info = write_submission_file(preds, data_dir, out)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {info['path']}: {info['rows']} rows, {info['predicted']} with a prediction"
                   + (f"; {info['dropped_ids']} prediction ids not in sample_submission.csv dropped"
                      if info["dropped_ids"] else ""))


# --- end to end: run, demo, config-example -------------------------------------

@cli.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--from", "from_stage", metavar="STAGE", help="Redo STAGE and every stage after it (e.g. tune, train:vgg16).")
@click.option("--only", metavar="STAGE", help="Redo just STAGE (all of a kind: train, predict, verify).")
@click.option("--dry-run", is_flag=True, help="Print the plan (run/skip and why, with each stage's images, time, "
              "disk and peak RAM) and run nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option("--measure", is_flag=True, help="With --dry-run: time a few of this competition's images per stage "
              "(about a minute) instead of the stored rates.")
@quiet_option
def run_cmd(config: str, from_stage: str | None, only: str | None, dry_run: bool, as_json: bool,
            measure: bool) -> None:
    """Run the pipeline of a TOML config; unchanged stages are skipped.

    Each stage is skipped when its config slice and input artefacts are unchanged since it wrote
    its output (fingerprints in <run>/manifest.json).

    Stages: data → localval → train:<model>… → predict:<model>… → ensemble → verify:val/test →
    tune → rescore → submission → [upload] → report. Artefacts and manifest.json go to
    <root>/<name>/; killing a run and re-running it redoes only the unfinished stage onward.

    \b
    Example:
      glr config-example > glr.toml
      glr run glr.toml --dry-run
      glr run glr.toml
      glr run glr.toml --from tune
    """
    from pipeline.run.stages import run
    from pipeline.run.summary import summary_table

    if (as_json or measure) and not dry_run:
        raise click.UsageError("--json and --measure go with --dry-run")
    if dry_run:
        from pipeline.run.costs import dry_run as plan_run

        plan = plan_run(config, from_stage=from_stage, only=only, measure=measure,
                        echo=(lambda s: None) if as_json else click.echo)
        if as_json:
            echo_json(plan)
        return
    manifest = run(config, from_stage=from_stage, only=only, dry_run=dry_run, echo=click.echo)
    if not dry_run:
        click.echo(summary_table(manifest))


@cli.command("infer")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Competition folder (train.csv, train/, test/, sample_submission.csv); may be read-only.")
@click.option("--out", default="submission.csv", show_default=True, type=Output(),
              help="Submission CSV to write; the tables go to OUT.infer/ beside it.")
@click.option("--expect-test", type=click.IntRange(min=1), default=None, metavar="N",
              help="Test images to project the time for [default: 120,000 for landmark-recognition-2020/2021, "
              "whose hidden test Kaggle runs the notebook on; else the visible test set].")
@click.option("--time-limit", "time_limit_h", type=click.FloatRange(min=0, min_open=True), default=12.0,
              show_default=True, metavar="HOURS", help="Refuse before the full run when the projection exceeds it.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Verification processes (0 = one per core) [default: the run's [verify] workers].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache [default: the run's [run] cache_dir if it exists, else DATA_DIR/.glr-cache, "
              "else OUT's folder/.glr-cache when DATA_DIR is read-only].")
@json_option
@quiet_option
def infer_cmd(source: str, data_dir: str, out: str, expect_test: int | None, time_limit_h: float,
              workers: int | None, cache_dir: str | None, as_json: bool) -> None:
    """The test-time half of a finished run: predict → ensemble → verify → rescore → submission.csv.

    SOURCE is a finished `glr run` folder or a `glr bundle` folder. The same code and options as the
    run's stages, so on the run's own competition the submission is byte-identical to the run's.
    The chain first runs on two samples of the test images (three predict batches), timed per stage;
    when the projection for --expect-test images exceeds --time-limit, infer stops there with one
    line (exit 1). The run folder is not written.

    \b
    Example:
      glr infer demo/run --data-dir demo/competition --out /tmp/submission.csv
    """
    from pipeline.run.infer import infer

    res = infer(source, data_dir, out, expect_test=expect_test, time_limit_h=time_limit_h, workers=workers,
                cache_dir=cache_dir, echo=(lambda s: None) if as_json else click.echo)
    if as_json:
        echo_json(res)


# --- caches --------------------------------------------------------------------

class _DefaultList(click.Group):
    """`glr cache [DATA_DIR]` lists; `glr cache prune …` prunes."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


_cache_args = [click.argument("data_dir", required=False, type=click.Path(file_okay=False)),
               click_option(RUN["cache_dir"])]


def _with_cache_args(f):
    for deco in reversed(_cache_args):
        f = deco(f)
    return f


def _cache_root(data_dir: str | None, cache_dir: str | None):
    from pipeline.caches import cache_root

    return cache_root(data_dir or DATA.default("data_dir"), cache_dir)


def _echo_caches(entries: list[dict]) -> None:
    import time

    from pipeline.caches import human_bytes

    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["last_used"] else "-"
        failed = f" ({e['failed']:,} failed)" if e.get("failed") else ""
        click.echo(f"{e['kind']:<11} {e['key']:<40} {e['entries']:>10,} entries{failed}  {human_bytes(e['bytes']):>9}"
                   f"  last used {used}")


@cli.group("cache", cls=_DefaultList, invoke_without_command=False)
def cache_group() -> None:
    """List (`glr cache [DATA_DIR]`) and prune (`glr cache prune`) the caches of a competition.

    The caches (decoded images, base features, local features) live in one folder per
    competition: --cache-dir, default DATA_DIR/.glr-cache. Prune deletes only folders glr wrote.

    \b
    Example:
      glr cache data
      glr cache prune data --older-than 30 --dry-run
      glr cache prune data --kind bottleneck --all
    """


@cache_group.command("list")
@_with_cache_args
@json_option
def cache_list_cmd(data_dir: str | None, cache_dir: str | None, as_json: bool) -> None:
    """List the caches: kind, key, entries, bytes on disk, last used; and the total."""
    from pipeline.caches import human_bytes, list_caches

    root = _cache_root(data_dir, cache_dir)
    entries = list_caches(root)
    total = sum(e["bytes"] for e in entries)
    if as_json:
        echo_json({"root": str(root), "caches": entries, "total_bytes": total})
        return
    if not entries:
        click.echo(f"{root}: no caches")
        return
    _echo_caches(entries)
    click.echo(f"{root}: {len(entries)} cache(s), {human_bytes(total)}")


@cache_group.command("prune")
@_with_cache_args
@click.option("--kind", type=click.Choice(["images", "bottleneck", "features"]), default=None,
              help="Only caches of this kind.")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None, metavar="DAYS",
              help="Caches not used for more than DAYS days.")
@click.option("--all", "everything", is_flag=True, help="Every cache (of --kind, if given).")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@json_option
def cache_prune_cmd(data_dir: str | None, cache_dir: str | None, kind: str | None, older_than: float | None,
                    everything: bool, dry_run: bool, as_json: bool) -> None:
    """Delete caches by kind and age (--older-than DAYS or --all). Only folders glr wrote are deleted."""
    from pipeline.caches import human_bytes, prune_caches

    root = _cache_root(data_dir, cache_dir)
    gone = prune_caches(root, kind=kind, older_than_days=older_than, everything=everything, dry_run=dry_run)
    freed = sum(e["bytes"] for e in gone)
    if as_json:
        echo_json({"root": str(root), "dry_run": dry_run, "deleted": gone, "freed_bytes": freed})
        return
    _echo_caches(gone)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{root}: {verb} {len(gone)} cache(s), {human_bytes(freed)}")


@cli.command("config-example")
def config_example_cmd() -> None:
    """Print a commented `glr run` config (every key, its default).

    \b
    Example:
      glr config-example > glr.toml
    """
    from pipeline.options import example_config

    click.echo(example_config(), nl=False)


@cli.command("demo")
@click.option("--out", default="demo", show_default=True, type=Output(folder=True),
              help="Folder for the synthetic competition, the config and the run.")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic competition and the run.")
@click.option("--overwrite", is_flag=True,
              help="Replace what an earlier glr demo wrote in OUT for other settings (never other files).")
@quiet_option
def demo_cmd(out: str, seed: int, overwrite: bool) -> None:
    """Synthetic competition + the whole pipeline on it (about 1–2 min).

    A small built-in config (demo/glr.toml) runs every real stage on a synthetic competition.

    Prints each model's GAP, the ensemble's, the ensemble after rescoring (tuning and held-out
    parts), time per stage, and the paths of the submission and the report.

    \b
    Example:
      glr demo --out demo
      glr run demo/glr.toml --dry-run     # re-running skips every finished stage
    """
    from pipeline.run.demo import demo
    from pipeline.run.summary import summary_table

    manifest = demo(out, seed=seed, overwrite=overwrite, echo=click.echo)
    click.echo(summary_table(manifest))




if __name__ == "__main__":
    main()
