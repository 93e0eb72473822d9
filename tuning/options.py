"""The option schema: one typed, documented definition per setting of a stage.

`Option` and `Section` live here, in the lowest layer that has stage options, so that
`tuning.search.tune` can take its defaults from `TUNE` without importing `pipeline`.
`pipeline.options` defines the other stages' sections with the same types and derives from
all of them the Click options, the `glr run` config validation, `glr config-example` and
docs/config.md. Pure Python: importing it costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from submissions.errors import UserError


@dataclass(frozen=True)
class Option:
    """One setting: its name (a keyword argument and a config key; `--dashed-name` on the CLI).

    `type` is int, float, str, bool or list (of `item`); `default=None` means "not set" (the
    help says what applies then, e.g. a value read from the model). `min`/`max` bound numbers
    (open bounds with `min_open`/`max_open`). `cli`/`config`: where the option appears.
    `flag` overrides the Click declaration (e.g. "--flip/--no-flip"). `path`: a config value
    resolved against the config file's folder. `advanced`: commented out in the example config.
    """

    name: str
    default: Any
    help: str
    type: type = str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    item: type | None = None
    cli: bool = True
    config: bool = True
    flag: str | None = None
    path: bool = False
    advanced: bool = False

    def __post_init__(self) -> None:
        if self.default is not None and self.type is float and isinstance(self.default, int):
            object.__setattr__(self, "default", float(self.default))

    @property
    def dashed(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str) -> Any:
        """`value` coerced to the option's type, or a UserError naming `where` (e.g. "[tune] trials")."""
        if value is None and self.default is None:
            return None
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise UserError(f"{where}: expected true or false, got {value!r}")
            return value
        if t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{where}: expected an integer, got {value!r}")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}: expected a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"{where}: expected a finite number, got {value!r}")
        elif t is str:
            if not isinstance(value, str):
                raise UserError(f"{where}: expected a string, got {_type_name(value)} {value!r}")
        elif t is list:
            if not isinstance(value, list):
                raise UserError(f"{where}: expected a list, got {value!r}")
            return [self._item(x, where) for x in value]
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
        self._range(value, where)
        return value

    def _item(self, x: Any, where: str) -> Any:
        if self.item is float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
                raise UserError(f"{where}: expected numbers, got {x!r}")
            x = float(x)
        elif self.item is str and not isinstance(x, str):
            raise UserError(f"{where}: expected strings, got {x!r}")
        self._range(x, where)
        return x

    def _range(self, v: Any, where: str) -> None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return
        lo_bad = self.min is not None and (v <= self.min if self.min_open else v < self.min)
        hi_bad = self.max is not None and (v >= self.max if self.max_open else v > self.max)
        if lo_bad or hi_bad:
            raise UserError(f"{where}: must be {self.range_text()}, got {v}")

    def range_text(self) -> str:
        """The allowed range in words ("at least 1", "in [0, 1)")."""
        if self.min is not None and self.max is not None:
            return (f"in {'(' if self.min_open else '['}{_num(self.min)}, "
                    f"{_num(self.max)}{')' if self.max_open else ']'}")
        if self.min is not None:
            return f"{'above' if self.min_open else 'at least'} {_num(self.min)}"
        if self.max is not None:
            return f"{'below' if self.max_open else 'at most'} {_num(self.max)}"
        return "any value"


@dataclass(frozen=True)
class Section:
    """The options of one stage (a `[name]` table of the config; the flags of its command)."""

    name: str
    help: str
    options: tuple[Option, ...]

    def __getitem__(self, key: str) -> Option:
        for o in self.options:
            if o.name == key:
                return o
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return any(o.name == key for o in self.options)

    def default(self, key: str) -> Any:
        return self[key].default

    def defaults(self) -> dict[str, Any]:
        """{name: default} of every option."""
        return {o.name: o.default for o in self.options}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


POLICIES = ("auto", "bands", "blend", "seed-rules", "identity")
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")


def check_storage_spec(spec: str, where: str = "--storage") -> None:
    """Refuse a URL with an unknown scheme before anything runs (a typo must not pass as a journal path).

    Here, not in tuning.storage, so that reading a config does not import Optuna.
    """
    if "://" not in spec:
        return
    scheme = spec.split("://", 1)[0].split("+", 1)[0]
    if scheme not in RDB_SCHEMES:
        raise UserError(f"{where} {spec!r}: unknown scheme {scheme!r}; use a journal file path, "
                        f"sqlite:///FILE.db or postgresql://USER@HOST/DB")

TUNE = Section("tune", "`glr tune`: choose the rescoring policy on the local validation split with Optuna.", (
    Option("policy", "auto", "Search bands, blend or both (auto); seed-rules / identity are fixed, for comparison.",
           choices=POLICIES),
    Option("trials", 100, "Finished trials the study should have in total (a re-run continues to it; "
           "0 = until the timeout).", type=int, min=0),
    Option("timeout", 0.0, "Stop searching after this many seconds (0 = no limit).", type=float, min=0),
    Option("storage", "", "Optuna storage: a journal file path or an RDB URL (sqlite:///x.db, "
           "postgresql://user@host/db) that several machines share; empty = a journal file beside the policy."),
    Option("study", "", "Study name; empty = derived from the inputs, policy, holdout and seed."),
    Option("jobs", 1, "Worker processes on this machine.", type=int, min=1),
    Option("holdout", 0.3, "Share of validation queries the study never sees; the policy is checked on them.",
           type=float, min=0, max=1, max_open=True),
    Option("seed", 0, "Seed of the split, TPE and the bootstrap.", type=int),
    Option("force", False, "Write the policy even if it loses on the held-out part (with a warning).", type=bool),
    Option("plots", True, "Write the PNG plots beside the policy.", type=bool),
    Option("bootstrap", 1000, "Resamples for the before/after 95% confidence intervals.", type=int, min=0,
           advanced=True),
))
