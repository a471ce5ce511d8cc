"""The feedback rules by name (``AlgorithmConfig(method=...)``, ``saef train --method ...``)."""

from __future__ import annotations

from typing import Dict, Tuple, Type

from .base import FeedbackRule
from .direct import Direct
from .ef import LocalErrorFeedback, StepAheadErrorFeedback
from .ef21 import EF21

__all__ = ["register_rule", "rule_class", "available_rules"]

_RULES: Dict[str, Type[FeedbackRule]] = {}


def register_rule(rule: Type[FeedbackRule], *, overwrite: bool = False) -> None:
    """Make ``rule`` (a :class:`FeedbackRule` subclass) available under its ``name``."""
    if not (isinstance(rule, type) and issubclass(rule, FeedbackRule)):
        raise ValueError(f"a feedback rule must be a FeedbackRule subclass, got {rule!r}")
    if rule.name in _RULES and not overwrite:
        raise ValueError(f"feedback rule {rule.name!r} is already registered (pass overwrite=True to replace it)")
    _RULES[rule.name] = rule


def rule_class(name: str) -> Type[FeedbackRule]:
    if name not in _RULES:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(available_rules())}")
    return _RULES[name]


def available_rules() -> Tuple[str, ...]:
    return tuple(_RULES)


for _rule in (LocalErrorFeedback, StepAheadErrorFeedback, EF21, Direct):
    register_rule(_rule)
