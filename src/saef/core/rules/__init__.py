"""Feedback rules: what each worker and the server keep and compress, and where gradients are taken.

One module per rule: :mod:`.ef` (EF and SAEF, Algorithm 1 of the paper), :mod:`.ef21` (EF21 / EF21-SGDM
with the EF21-P downlink), :mod:`.direct` (compressed SGD without feedback). :mod:`.base` states the
interface; :mod:`.registry` maps names to rules.
"""

from .base import FeedbackRule, Plan
from .registry import available_rules, register_rule, rule_class

__all__ = ["FeedbackRule", "Plan", "available_rules", "register_rule", "rule_class"]
