"""Where a `glr tune` study lives, and how trials of dead workers are recovered.

By default an Optuna journal file beside the policy (`policy.optuna.journal`): an interrupted study
resumes where it stopped and several processes (`--jobs`) share it without "database is locked".
A journal has no heartbeat, so a trial whose process died (kill -9) is failed and its parameters
re-queued when the next `glr tune` on this machine opens the study (`recover_dead_trials`). Any
Optuna RDB URL (`postgresql://…`, `mysql://…`, `sqlite:///x.db`) lets `glr tune` processes on
several machines share one study; those run with heartbeats, and a trial whose worker died is
retried by Optuna's own callback. Only Optuna's public API is used.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from submissions.errors import UserError
from tuning.options import check_storage_spec

JOURNAL_LOCK_GRACE_S = 10  # a lock left by a killed writer is broken after this long


def default_storage(out: str | os.PathLike) -> str:
    """The journal file beside the policy: `policy.json` → `policy.optuna.journal`."""
    out = Path(out)
    return str(out.with_name(out.stem + ".optuna.journal"))


def open_storage(storage: str | None, out: str | os.PathLike):
    """An Optuna storage from `--storage`: None → journal file beside `out`; a path or
    `journal:PATH` → journal file; an RDB URL (sqlite:///, postgresql://, mysql://) → RDBStorage
    with heartbeat and retry of trials whose worker died. Raises UserError for an unknown scheme,
    a missing driver or a database that cannot be opened."""
    spec = storage or default_storage(out)
    if "://" in spec:
        return _rdb_storage(spec)
    path = Path(spec[len("journal:"):] if spec.startswith("journal:") else spec)
    if path.is_dir():
        raise UserError(f"--storage {path}: is a directory, expected a journal file path or a database URL")
    return _journal_storage(path)


def _rdb_storage(spec: str):
    check_storage_spec(spec)
    scheme = spec.split("://", 1)[0].split("+", 1)[0]
    kwargs = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(spec, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=90, **_retry())
    except (ImportError, ModuleNotFoundError) as e:
        raise UserError(f"--storage {spec!r}: the database driver is not installed ({e})") from None
    except Exception as e:  # sqlalchemy raises many kinds
        raise UserError(f"--storage {spec!r}: cannot open ({e.__class__.__name__}: {e})") from None


def _retry() -> dict:
    """RDBStorage's keyword that retries (up to 3 times) a trial whose worker's heartbeat stopped."""
    try:  # Optuna >= 4.9 renamed the retry callback
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

        return {"heartbeat_stale_trial_callback": Retry(max_retry=3)}
    except ImportError:
        from optuna.storages import RetryFailedTrialCallback as Retry

        return {"failed_trial_callback": Retry(max_retry=3)}


def _journal_storage(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
    return JournalStorage(UnsyncedJournalFile(str(path), lock))


class UnsyncedJournalFile(BaseJournalBackend):
    """Optuna's journal file format without the fsync after every record.

    A trial writes ~30 records (one per parameter); Optuna's `JournalFileBackend` fsyncs each,
    which made a trial cost ~150 ms here, 10x the trial itself. Records still reach the file (the
    OS page cache) before `append_logs` returns, under the same lock, so a killed process (kill -9)
    loses nothing it wrote; only an operating system crash could lose the last records — at worst
    the last trials, which a re-run redoes.

    Built on the public extension point (`BaseJournalBackend`, the lock's acquire/release):
    reading is delegated to a `JournalFileBackend` on the same file (its offset cache and
    partial-line handling), appending is the same one-line-per-record JSON as Optuna's.
    """

    def __init__(self, path: str, lock) -> None:
        self.path, self.lock = path, lock
        self.reader = JournalFileBackend(path, lock_obj=lock)  # creates the file if missing

    def read_logs(self, log_number_from: int):
        return self.reader.read_logs(log_number_from)

    def append_logs(self, logs: list[dict]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        self.lock.acquire()
        try:
            with open(self.path, "ab") as f:
                f.write(data)
        finally:
            self.lock.release()


def storage_label(storage: str | None, out) -> str:
    """The storage as printed and recorded in the policy (an RDB URL's password left out)."""
    spec = storage or default_storage(out)
    if "://" in spec and "@" in spec:  # never echo a password
        head, tail = spec.split("://", 1)
        spec = f"{head}://…@{tail.rsplit('@', 1)[1]}"
    return spec


def worker_tag() -> str:
    """`host:pid` of this process, stored on each trial so a dead worker's trials can be found."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study, storage) -> int:
    """Fail the RUNNING trials whose process on this machine is gone (killed) and re-queue their
    parameters, so no trial is lost. Only for journal storages (`storage` is the one `study` was
    opened on): they have no heartbeat, while RDB storages retry such trials themselves. Returns
    how many were re-queued."""
    if not isinstance(storage, JournalStorage):
        return 0
    requeued = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(t):
            continue
        try:  # not skip_if_finished=True: a trial another process has just finished must not be re-queued
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):  # finished before our read / between read and write
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        requeued += 1
    return requeued


def _is_dead(trial) -> bool:
    """Its worker was on this machine and is gone; untagged (died before tagging): older than 2 min."""
    tag = str(trial.user_attrs.get("worker", ""))
    if tag:
        host, _, pid = tag.rpartition(":")
        return host == socket.gethostname() and not _alive(int(pid))
    start = trial.datetime_start
    return start is not None and (time.time() - start.timestamp()) >= 120
