"""The schema of a run's configuration: every key declared once, everything else derived from it.

A key of :class:`~saef.app.config.TrainConfig` is a dataclass field made by :func:`key`, which puts in the
field's metadata what the rest of ``saef train`` needs to know about it::

    lr: float = key(0.1, help="learning rate", on_resume=FREE, check=check_lr)
    workers: int = key(4, help="number of workers K", on_resume=RESETS_ERRORS, range=(1, 1 << 16))

From these declarations (and the field's type) come

* the command-line flags (:func:`add_flags`, :func:`flag_values`): ``--lr``, with the help line and the default;
* the validation of one key's value (:func:`check_value`): its type, range, choices or check, raising
  :class:`ConfigError` naming the key and the allowed values (relations between keys stay in TrainConfig);
* the resume rules (:func:`refuse_resume_changes`): what changing the key on ``--resume`` means --
  :data:`FREE` (allowed), :data:`RESETS_ERRORS` (allowed only with ``--reset-errors``: the saved worker
  errors would be meaningless) or :data:`REFUSED` (another run altogether);
* the checkpoint identity (:func:`identity`, :func:`identity_differences`): the values of the keys that are not
  FREE, which a checkpoint records and is checked against when it is resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["FREE", "RESETS_ERRORS", "REFUSED", "ConfigError", "Key", "key", "spec", "keys", "default_of", "keys_with",
           "check_value", "help_text", "add_flags", "flag_values", "none_words", "refuse_resume_changes", "identity",
           "identity_differences"]

FREE = "free"  # a change on resume is simply taken (lr, epochs, checkpointing, where the data lives, ...)
RESETS_ERRORS = "resets errors"  # the saved momentum and errors would be meaningless: needs --reset-errors
REFUSED = "refused"  # another run altogether (data, model, seed, precision, backend): start a new run
RULES = (FREE, RESETS_ERRORS, REFUSED)
_SCHEMA = "saef.schema"  # the metadata entry of a declared field


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass(frozen=True)
class Key:
    """What the schema knows of one key besides its name, type and default."""

    help: str  # the help line of its flag (the default is appended; "{choices}" becomes the choices as registered then)
    on_resume: str  # FREE, RESETS_ERRORS or REFUSED
    range: Optional[Tuple[float, float]] = None  # low..high inclusive (of each element, for a list)
    low_open: bool = False  # the range excludes its low end (numbers that must be > low)
    choices: Union[None, Sequence[str], Callable[[], Sequence[str]]] = None  # a callable: read from a registry when checked
    check: Optional[Callable[[Any], Any]] = None  # raises ValueError (with a message naming the key) on a bad value
    none_word: Optional[str] = None  # a word that means None on the command line and in TOML ("never")
    off_flag: Optional[str] = None  # a bool that defaults to True: the flag that turns it off

    def allowed(self) -> Optional[Sequence[str]]:
        return self.choices() if callable(self.choices) else self.choices


def key(default: Any, *, help: str, on_resume: str, **rules) -> Any:
    """A declared key: a dataclass field with ``default`` whose metadata holds a :class:`Key` (``help``,
    ``on_resume`` and any of ``range``, ``low_open``, ``choices``, ``check``, ``none_word``, ``off_flag``)."""
    if not isinstance(help, str) or not help.strip():
        raise ValueError("every key needs a help line")
    if on_resume not in RULES:
        raise ValueError(f"on_resume = {on_resume!r}: choose one of {', '.join(RULES)}")
    metadata = {_SCHEMA: Key(help, on_resume, **rules)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec(field: dataclasses.Field) -> Key:
    """The declaration of ``field``; a field not made by :func:`key` is a mistake of the declaring class."""
    declared = field.metadata.get(_SCHEMA)
    if declared is None:
        raise TypeError(f"{field.name} is not declared with saef.app.schema.key()")
    return declared


def keys(cls) -> List[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def default_of(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def keys_with(cls, rule: str) -> Tuple[str, ...]:
    """The names of the keys of ``cls`` whose change on resume is ``rule``, in declaration order."""
    return tuple(f.name for f in keys(cls) if spec(f).on_resume == rule)


# --- validation of one value ----------------------------------------------------------------------
_TYPES = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}
_TYPES["List[int]"] = (lambda v: isinstance(v, (list, tuple)) and all(_TYPES["int"][0](i) for i in v), "a list of integers")
_TYPES["List[float]"] = (lambda v: isinstance(v, (list, tuple)) and all(_TYPES["float"][0](i) for i in v), "a list of numbers")


def _base_type(annotation: str) -> Tuple[str, bool]:
    optional = annotation.startswith("Optional[")
    return (annotation[len("Optional["):-1] if optional else annotation), optional


def check_value(field: dataclasses.Field, value: Any) -> None:
    """``value`` for ``field``: of its type, in its range and choices, and passing its check; else ConfigError."""
    name, declared = field.name, spec(field)
    base, optional = _base_type(field.type)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must be set (a {base})")
    ok, described = _TYPES[base]
    if not ok(value):
        raise ConfigError(f"{name} must be {described}, got {value!r} ({type(value).__name__})")
    if declared.range is not None:
        low, high = declared.range
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(not (low < v if declared.low_open else low <= v) or not v <= high for v in values):
            raise ConfigError(f"{name} = {value!r} is not allowed: must be {_describe_range(base, declared)}")
    allowed = declared.allowed()
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed: choose one of {', '.join(allowed)}")
    if declared.check is not None:
        try:
            declared.check(value)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def _describe_range(base: str, declared: Key) -> str:
    low, high = (_number(v) for v in declared.range)
    if base.startswith("List"):
        return f"integers from {low} to {high}" if "int" in base else f"numbers from {low} to {high}"
    if base == "int":
        return f"an integer from {low} to {high}"
    return f"a number {'>' if declared.low_open else '>='} {low} and <= {high}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def none_words(cls, values: Dict[str, Any]) -> Dict[str, Any]:
    """``values`` with each key's none word (``average_every = "never"``) read as None, which no flag can say."""
    words = {f.name: spec(f).none_word for f in keys(cls) if spec(f).none_word is not None}
    return {k: (None if k in words and v == words[k] else v) for k, v in values.items()}


# --- the command line -----------------------------------------------------------------------------
def _comma_list(kind: Callable, described: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {described}, got {text!r}") from None

    return parse


def _or_word(kind: Callable, word: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text == word:
            return word
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_TYPES[kind.__name__][1]} or {word!r}, got {text!r}") from None

    return parse


_FLAG_TYPES = {"int": int, "float": float, "str": str, "List[int]": _comma_list(int, "integers"),
               "List[float]": _comma_list(float, "numbers")}


def help_text(declared: Key) -> str:
    """The help line, with ``{choices}`` read from the registry when the parser is made (a rule, dataset or
    backend registered by then is listed)."""
    if "{choices}" not in declared.help:
        return declared.help
    return declared.help.replace("{choices}", ", ".join(declared.allowed() or ()))


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per key of ``cls`` (``--name-with-dashes``), with its help line and default; every flag's
    value is None when not given, so that a TOML file's value stands."""
    for field in keys(cls):
        declared, flag = spec(field), "--" + field.name.replace("_", "-")
        declared = dataclasses.replace(declared, help=help_text(declared))
        base, _ = _base_type(field.type)
        if base == "bool":
            if declared.off_flag is None:  # an on/off switch (default off)
                parser.add_argument(flag, action="store_const", const=True, default=None, help=declared.help + _note(declared))
                continue
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, dest=field.name, action="store_const", const=True, default=None, help=declared.help + _note(declared))
            group.add_argument(declared.off_flag, dest=field.name, action="store_const", const=False)
            continue
        kind = _FLAG_TYPES[base]
        if declared.none_word is not None:
            kind = _or_word(kind, declared.none_word)
        default = default_of(field)  # (a None default is described by the help line itself)
        shown = f" (default: {default}{_RESUME_NOTE[declared.on_resume]})" if default is not None else _note(declared)
        parser.add_argument(flag, type=kind, default=None, help=declared.help + shown)


_RESUME_NOTE = {FREE: "", RESETS_ERRORS: "; a change on --resume needs --reset-errors", REFUSED: "; fixed for the run"}


def _note(declared: Key) -> str:
    return f" ({_RESUME_NOTE[declared.on_resume][2:]})" if declared.on_resume != FREE else ""


def flag_values(args: argparse.Namespace, cls) -> Dict[str, Any]:
    """The keys' values as parsed (None where no flag was given)."""
    return {f.name: getattr(args, f.name) for f in keys(cls)}


# --- resume ---------------------------------------------------------------------------------------
def refuse_resume_changes(cls, changed: Dict[str, Tuple[Any, Any]], reset_errors: bool) -> None:
    """Raise ConfigError if ``changed`` (key -> (saved, new)) changes a REFUSED key, or a RESETS_ERRORS key
    without ``reset_errors``."""
    for name in keys_with(cls, REFUSED):
        if name in changed:
            old, new = changed[name]
            raise ConfigError(f"{name} cannot change on resume ({old!r} -> {new!r}); start a new run")
    for name in keys_with(cls, RESETS_ERRORS):
        if name in changed and not reset_errors:
            old, new = changed[name]
            raise ConfigError(
                f"{name} changed on resume ({old!r} -> {new!r}): the saved worker errors cannot be "
                "carried over; pass --reset-errors to start them from zero (this is logged in the records)"
            )


def identity(config) -> Dict[str, Any]:
    """What a checkpoint of ``config`` records about the run, to be checked on resume: the resolved value
    (``config.to_dict()``) of every key that is not FREE."""
    values = config.to_dict()
    return {f.name: values[f.name] for f in keys(type(config)) if spec(f).on_resume != FREE}


def identity_differences(cls, saved: Any, current: Dict[str, Any], reset_errors: bool) -> List[str]:
    """The entries of a checkpoint's recorded identity ``saved`` that disagree with ``current``, as
    ``"key = saved (this run: current)"``. Only the keys the checkpoint records are compared (one written
    before a key joined the identity says nothing about it; the run's config.json, whose changes
    :func:`refuse_resume_changes` has checked, speaks for it). With ``reset_errors``, the RESETS_ERRORS keys
    may differ."""
    if not isinstance(saved, dict):
        return [f"no recorded settings (found {type(saved).__name__})"]
    free = set(keys_with(cls, RESETS_ERRORS)) if reset_errors else set()
    return [f"{name} = {value!r} (this run: {current.get(name, 'not recorded')!r})"
            for name, value in saved.items() if name not in free and current.get(name, _ABSENT) != value]


_ABSENT = object()
