"""Kaggle's side of the road: `glr fetch` (download + safe extraction) and `glr submit` (upload).

Both go through the official `kaggle` client (`KaggleApi`), imported lazily because it
authenticates at import. Credentials come from where the client looks: `KAGGLE_API_TOKEN`,
`KAGGLE_USERNAME`/`KAGGLE_KEY`, or `~/.kaggle/kaggle.json`. Every failure a person can fix
(no or rejected credential, rules not accepted, wrong name, refused submission) becomes one
`UserError` line that says what to do.

Download state lives in `DATA_DIR/.glr-fetch/`: the archive being downloaded (the client
resumes it from the bytes on disk after a cut or a kill) and, once extracted, a small JSON
record so a re-run skips the finished bundle without asking Kaggle again.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path, PurePosixPath

from submissions.errors import UserError
from submissions.files import atomic_write_text

STATE_DIR = ".glr-fetch"
TOKEN_PAGE = "https://www.kaggle.com/settings/api"
NOTEBOOK_HINT = (
    "2020 and 2021 are code competitions, scored from a Kaggle notebook: build it with `glr bundle` and `glr notebook --push "
    "--wait`, then `glr submit --kernel USER/SLUG` (see README, 'Code competitions')"
)


def _config_path() -> str:
    base = os.environ.get("KAGGLE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".kaggle")
    return os.path.join(base, "kaggle.json")


def _credential_source() -> str:
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    return _config_path()


def _config_problem(path: str) -> str | None:
    """Why the credentials file at `path` cannot serve (the client silently ignores a broken one), or None."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except IsADirectoryError:
        return "is a folder, not a file"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not an object with username and key"
    for field in ("username", "key"):
        if not isinstance(data.get(field), str) or not data[field].strip():
            return f"has no {field!r} (a non-empty string)"
    return None


def _no_credentials() -> UserError:
    if os.environ.get("KAGGLE_API_TOKEN"):
        return UserError(
            "Kaggle did not accept the token in KAGGLE_API_TOKEN (expired or revoked): "
            f"create a new one at {TOKEN_PAGE} and set KAGGLE_API_TOKEN again"
        )
    return UserError(
        f"no Kaggle credentials: create an API token at {TOKEN_PAGE} and save it as {_config_path()} "
        "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN"
    )


def _api():
    """An authenticated `KaggleApi`; its chatter on stdout is kept off ours.

    A credentials file the client cannot use is named first: the client would ignore it silently
    ("no credentials") or fail inside with a traceback, depending on how it is broken.
    """
    problem = _config_problem(_config_path())
    if problem:
        raise UserError(
            f"{_config_path()}: malformed Kaggle credentials file: it {problem}; fix or remove it — download a "
            f"new API token at {TOKEN_PAGE} and save it there (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY"
        )
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            import kaggle  # noqa: F401  (authenticates at import; failures are swallowed there)
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except SystemExit:  # the client's "Authentication required" path calls exit(1)
        raise _no_credentials() from None
    except Exception as e:  # HTTP 401 while checking a token, no connection, …
        raise _translate(e, None, "authenticate") from None
    if "readable by other users" in sink.getvalue():
        print(f"Warning: {_config_path()} is readable by other users; run chmod 600 on it", file=sys.stderr)
    return api


def _translate(e: Exception, competition: str | None, action: str) -> Exception:
    """One clear UserError for an exception raised by the kaggle client (others pass through)."""
    import requests

    if isinstance(e, UserError):
        return e
    if isinstance(e, requests.HTTPError) and e.response is not None:
        status = e.response.status_code
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.response.reason
        comp = competition or "?"
        if status == 401:
            return UserError(
                f"Kaggle rejected the credentials from {_credential_source()} (401): check the username and key, "
                f"or create a new token at {TOKEN_PAGE}"
            )
        if status == 403:
            return UserError(
                f"Kaggle refused access to competition {comp!r} (403: {detail}): accept its rules at "
                f"https://www.kaggle.com/competitions/{comp}/rules with the same account, then re-run"
            )
        if status == 404:
            return UserError(
                f"Kaggle found no competition or file {comp!r} (404: {detail}): check the name "
                "(e.g. landmark-recognition-2021) and any --files names"
            )
        if action == "submit" and 400 <= status < 500:
            return UserError(f"Kaggle refused the file submission to {comp!r} ({status}: {detail}); {NOTEBOOK_HINT}")
        return UserError(f"Kaggle API error during {action} of {comp!r} ({status}: {detail}); re-run later")
    if isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return UserError(
            f"cannot reach Kaggle during {action} ({type(e).__name__}); check the network and re-run "
            "(finished work is kept, downloads resume)"
        )
    return e


@contextlib.contextmanager
def _kaggle_errors(competition: str, action: str):
    """Translate client errors; send its stdout chatter (progress messages) to stderr."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except Exception as e:
        t = _translate(e, competition, action)
        if t is e:
            raise
        raise t from None


def _check_name(name: str, what: str) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts:
        raise UserError(f"{what} {name!r}: must be a relative name inside the competition (no '..', no leading '/')")


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------
def _state_path(root: Path, competition: str) -> Path:
    return root / STATE_DIR / f"{competition}.done.json"


def _bundle_complete(root: Path, competition: str) -> bool:
    """True when an earlier run extracted the whole bundle and every file is still there."""
    path = _state_path(root, competition)
    try:
        state = json.loads(path.read_text())
        sizes = state["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in sizes.items():
        try:
            if (root / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _downloaded(staging: Path, stem: str) -> Path | None:
    """The file the client wrote for `stem` (its extension comes from the download URL)."""
    cands = [p for p in staging.glob(stem + ".*") if p.is_file() and not p.name.endswith((".kaggle-partial", ".json"))]
    cands += [p for p in [staging / stem] if p.is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _summary(root: Path) -> dict | None:
    from pipeline.acquire.competition import Competition

    try:
        return Competition(root).summary()
    except UserError:
        return None


def fetch(competition: str, data_dir: str | os.PathLike, *, files: list[str] | None = None, force: bool = False) -> dict:
    """Download a competition's files with the official client and extract them safely.

    Without `files`, the whole bundle (`<competition>.zip`) is downloaded into
    `data_dir/.glr-fetch/`, resumed if a previous run was cut, extracted member by member
    (zip-slip and symlinks refused, each file renamed into place whole), then the archive is
    deleted and a record kept so a re-run returns at once. With `files`, each named file is
    fetched on its own (a server-zipped `<file>.zip` is unwrapped). `force` downloads again.
    Returns counts plus the `Competition` summary when `data_dir` is a competition directory.
    """
    from pipeline.acquire.archive import safe_extract
    from pipeline.progress import enabled

    root = Path(data_dir)
    if not competition or "/" in competition or competition.startswith("."):
        raise UserError(f"competition {competition!r}: give Kaggle's short name, e.g. landmark-recognition-2021")
    staging = root / STATE_DIR
    staging.mkdir(parents=True, exist_ok=True)
    quiet = not enabled()
    out: dict = {"competition": competition, "data_dir": str(root), "downloaded": [], "skipped": [], "extracted": 0}

    if files:
        names = [f.strip() for f in files if f.strip()]
        for name in names:
            _check_name(name, "--files entry")
        todo = [n for n in names if force or not (root / n).is_file()]
        out["skipped"] = [n for n in names if n not in todo]
        api = _api() if todo else None
        for name in todo:
            sub = staging / "files"
            with _kaggle_errors(competition, "download"):
                api.competition_download_file(competition, name, path=str(sub), force=force, quiet=quiet)
            parent = sub / PurePosixPath(name).parent
            got = _downloaded(parent, PurePosixPath(name).name)
            if got is None:
                raise UserError(f"{competition}: the download of {name!r} left no file under {parent}; re-run")
            final = root / name
            if got.name == PurePosixPath(name).name + ".zip" and got.name != PurePosixPath(name).name:
                _unwrap(got, final, staging)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(got, final)
            out["downloaded"].append(name)
    else:
        if not force and _bundle_complete(root, competition):
            out["skipped"] = [f"{competition}.zip"]
            for leftover in staging.glob(f"{competition}.zip*"):
                leftover.unlink()
        else:
            api = _api()
            with _kaggle_errors(competition, "download"):
                api.competition_download_files(competition, path=str(staging), force=force, quiet=quiet)
            archive = _downloaded(staging, competition)
            if archive is None:
                raise UserError(f"{competition}: the download left no archive in {staging}; re-run")
            import zipfile

            if zipfile.is_zipfile(archive):
                from pipeline.acquire.archive import check_archive

                members = check_archive(archive, root)
                stats = safe_extract(archive, root, tmp_dir=staging / "extract", desc=f"extract {archive.name}",
                                     overwrite=force)
                atomic_write_text(
                    _state_path(root, competition),
                    json.dumps({"archive": archive.name, "files": {m.filename: m.file_size for m in members}}),
                )
                archive.unlink()  # the files are in place; the archive would double the disk use
                out["extracted"] = stats["extracted"]
                out["already_there"] = stats["skipped"]
            else:
                os.replace(archive, root / archive.name)
            out["downloaded"] = [archive.name]
    out["summary"] = _summary(root)
    return out


def _unwrap(wrapper: Path, final: Path, staging: Path) -> None:
    """Kaggle zips big single files (`x.csv` arrives as `x.csv.zip`): extract the one member to `final`."""
    import shutil
    import zipfile

    from pipeline.acquire.archive import check_archive

    members = check_archive(wrapper, final.parent)
    if len(members) != 1:
        raise UserError(f"{wrapper}: expected one file inside a server-zipped download, found {len(members)}")
    tmp = staging / "unwrap.part"
    try:
        with zipfile.ZipFile(wrapper) as zf, zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:  # CRC mismatch, truncated data: as safe_extract reports it
        tmp.unlink(missing_ok=True)
        raise UserError(f"{wrapper}: member {members[0].filename!r} is corrupt ({e}); delete it and re-run") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    wrapper.unlink()


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------
def check_before_upload(
    submission: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, check_ids: bool = True
) -> Path | None:
    """Everything `submit` checks before it sends a byte; returns the sample it checked the ids against.

    The file is held to the one grammar of the format (`submissions.format`, the same reader as
    `glr gap` and `glr write-submission`), and its ids to the competition's sample_submission.csv
    (`data_dir` is the competition folder or that file). Without a sample the ids cannot be checked,
    so that is refused unless `check_ids` is False (an explicit `--no-id-check`).
    """
    from submissions.format import SAMPLE_SUBMISSION, check_submission, sample_submission_path

    path = Path(submission)
    if not path.is_file():
        raise UserError(f"{path}: no such submission file (write one with `glr write-submission`)")
    sample = None
    if data_dir is not None:
        sample = sample_submission_path(data_dir)  # a UserError when the folder has none
    elif check_ids:
        raise UserError(f"{path}: give --data-dir (the competition folder or its {SAMPLE_SUBMISSION}) so its ids "
                        "are checked before the upload, or --no-id-check to upload without that check")
    check_submission(path, sample)
    return sample


def submit(
    submission: str | os.PathLike, competition: str, message: str, *, data_dir: str | os.PathLike | None = None,
    check_ids: bool = True,
) -> dict:
    """Validate a submission file (`check_before_upload`), then upload it with the official client.

    Validation runs first, so an invalid file (or one whose ids were not checked, unless
    `check_ids` is False) is never uploaded. The upload is StartSubmissionUpload → PUT →
    CreateSubmission. A refused file submission (the 2020/2021 code competitions) is one line
    pointing to running glr inside a Kaggle notebook. Returns Kaggle's message, the submission ref
    and a URL.
    """
    path = Path(submission)
    if not message or not message.strip():
        raise UserError("-m/--message: give a short description of this submission")
    sample = check_before_upload(path, data_dir=data_dir, check_ids=check_ids)
    api = _api()
    with _kaggle_errors(competition, "submit"):
        resp = api.competition_submit(str(path), message, competition, quiet=True)
    if resp.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise UserError(f"the upload of {path} to Kaggle did not complete; re-run `glr submit` to try again")
    return {
        "competition": competition,
        "file": str(path),
        "validated_against": str(sample) if sample else None,
        "message": resp.message,
        "ref": resp.ref,
        "url": f"https://www.kaggle.com/competitions/{competition}/submissions",
    }


# --------------------------------------------------------------------------------------------
# code competitions: dataset upload, kernel push, wait, code submission
# --------------------------------------------------------------------------------------------
KERNEL_OUTPUT = "submission.csv"  # the file a code competition scores, in the notebook's working folder


def _check_ref(ref: str, what: str) -> tuple[str, str]:
    owner, _, slug = (ref or "").partition("/")
    if not owner or not slug or "/" in slug:
        raise UserError(f"{what} {ref!r}: give it as USER/SLUG (your Kaggle user name and a short name)")
    return owner, slug


@contextlib.contextmanager
def _code_errors(ref: str, action: str):
    """One UserError line for what the client raises while it handles dataset/kernel `ref`."""
    import requests

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except UserError:
        raise
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "?"
        if status in (401,) or status == 0:
            raise _translate(e, None, action) from None
        if status == 403:
            raise UserError(f"Kaggle refused {action} of {ref!r} (403: {detail}): the slug belongs to another user "
                            "or your account may not write it; use USER/SLUG with your own user name") from None
        if status == 404:
            raise UserError(f"Kaggle found no {ref!r} during {action} (404: {detail}): check the USER/SLUG "
                            "(upload the bundle first with `glr bundle … --upload`)") from None
        raise UserError(f"Kaggle API error during {action} of {ref!r} ({status}: {detail}); re-run later") from None
    except ValueError as e:  # the client's own checks of the metadata (slug length, title, …)
        raise UserError(f"{action} of {ref!r}: {e}") from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _translate(e, None, action) from None


def upload_dataset(folder: str | os.PathLike, *, notes: str = "glr bundle") -> dict:
    """Upload a bundle folder (with its dataset-metadata.json) as a private Kaggle dataset.

    A new dataset when its id is free, else a new version of it. Folders inside the bundle go up
    as one zip each (the client's dir_mode "zip"), which Kaggle unpacks into the same folders.
    """
    import requests

    folder = Path(folder)
    meta_path = folder / "dataset-metadata.json"
    try:
        ref = json.loads(meta_path.read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path}: no dataset metadata with an id; build the folder with `glr bundle`") from None
    _check_ref(ref, "dataset")
    api = _api()
    exists = True
    with _code_errors(ref, "dataset upload"):
        try:
            api.dataset_status(ref)
        except requests.HTTPError as e:
            if e.response is None or e.response.status_code != 404:
                raise
            exists = False
        if exists:
            resp = api.dataset_create_version(str(folder), notes, quiet=True, dir_mode="zip")
        else:
            resp = api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip")
    if resp is None or (resp.status or "").lower() != "ok":
        error = getattr(resp, "error", None) or "no answer"
        if "already in use" in error:
            raise UserError(f"dataset {ref!r}: the slug is already in use by another dataset; choose another "
                            "--dataset USER/SLUG")
        raise UserError(f"Kaggle refused the dataset {ref!r}: {error}")
    return {"dataset": ref, "created": not exists, "url": resp.url or f"https://www.kaggle.com/datasets/{ref}"}


def push_kernel(folder: str | os.PathLike) -> dict:
    """Push a kernel folder (kernel-metadata.json + notebook): Kaggle saves a new version and runs it."""
    folder = Path(folder)
    meta_path = folder / "kernel-metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
        ref = meta["id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path}: no kernel metadata with an id; write the folder with `glr notebook`") from None
    _check_ref(ref, "kernel")
    api = _api()
    with _code_errors(ref, "kernel push"):
        resp = api.kernels_push(str(folder))
    if resp.error:
        raise UserError(f"Kaggle refused the notebook {ref!r}: {resp.error}")
    missing = list(resp.invalidDatasetSources or []) + list(resp.invalidCompetitionSources or [])
    if missing:
        raise UserError(f"notebook {ref!r} (version {resp.versionNumber}) was saved, but Kaggle could not attach "
                        f"{', '.join(missing)}: upload the dataset (`glr bundle … --upload`) and accept the "
                        "competition's rules, then push again")
    return {"kernel": ref, "version": resp.versionNumber, "url": resp.url}


def _kernel_log_tail(api, ref: str, version: int | None, lines: int) -> list[str]:
    """The last `lines` lines the kernel printed (Kaggle keeps its log as JSON stream records)."""
    from kagglesdk.kernels.types.kernels_api_service import ApiListKernelSessionOutputRequest

    owner, slug = _check_ref(ref, "kernel")
    req = ApiListKernelSessionOutputRequest()
    req.user_name, req.kernel_slug = owner, slug
    if version:
        req.version_label = f"v{version}"  # the API's label (the client writes it so too)
    with _code_errors(ref, "kernel log"), api.build_kaggle_client() as client:
        log = client.kernels.kernels_api_client.list_kernel_session_output(req).log or ""
    try:
        text = "".join(rec.get("data", "") for rec in json.loads(log))
    except (ValueError, AttributeError, TypeError):
        text = log
    return text.splitlines()[-lines:]


def wait_kernel(kernel: str, *, version: int | None = None, poll_s: float = 30.0, timeout_s: float = 13 * 3600,
                echo=print, log_lines: int = 20) -> dict:
    """Poll a pushed kernel until it completes (returns) or fails (UserError with its log's tail).

    The default timeout is past Kaggle's 12-hour notebook limit, so Kaggle's verdict comes first.
    """
    import time

    _check_ref(kernel, "kernel")
    label = f"{kernel}" + (f" version {version}" if version else "")
    api = _api()
    start = time.monotonic()
    while True:
        with _code_errors(kernel, "kernel status"):
            resp = api.kernels_status(kernel + (f"/{version}" if version else ""))
        status = getattr(resp.status, "name", str(resp.status)).upper()
        elapsed = time.monotonic() - start
        echo(f"notebook {label}: {status.lower()} ({elapsed / 60:.1f} min)")
        if status == "COMPLETE":
            return {"kernel": kernel, "version": version, "status": "complete", "seconds": round(elapsed, 1)}
        if status in ("ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"):
            tail = _kernel_log_tail(api, kernel, version, log_lines)
            for line in tail:
                echo(f"  | {line}")
            reason = resp.failure_message or status.lower()
            raise UserError(f"notebook {label} failed on Kaggle: {reason} (log tail above); fix it and push again")
        if elapsed > timeout_s:
            raise UserError(f"notebook {label} still {status.lower()} after {elapsed / 3600:.1f} h; "
                            "check it on Kaggle and wait again")
        time.sleep(poll_s)


def submit_kernel(kernel: str, competition: str, message: str, *, version: int | None = None) -> dict:
    """Submit a kernel version's `submission.csv` to a code competition (Kaggle re-runs it on the hidden test)."""
    if not message or not message.strip():
        raise UserError("-m/--message: give a short description of this submission")
    _check_ref(kernel, "--kernel")
    api = _api()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            resp = api.competition_submit_code(KERNEL_OUTPUT, message, competition, kernel=kernel,
                                               kernel_version=version, quiet=True)
    except Exception as e:
        import requests

        if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in (400, 404):
            detail = str(e).strip().splitlines()[0] if str(e).strip() else e.response.reason
            raise UserError(f"Kaggle refused notebook {kernel!r}" + (f" version {version}" if version else "")
                            + f" for {competition!r} ({e.response.status_code}: {detail}); check `glr notebook "
                            "--push --wait` completed and the notebook is attached to the competition") from None
        t = _translate(e, competition, "code submission")
        if t is e:
            raise
        raise t from None
    return {"competition": competition, "kernel": kernel, "version": version, "message": resp.message,
            "ref": resp.ref, "url": f"https://www.kaggle.com/competitions/{competition}/submissions"}
