"""Kubernetes label selectors (matchLabels, matchExpressions): checking and matching.

Shared by the agent (which pods and namespaces to meter) and the operator
(which nodes a FlowExporter selects), so both read a selector the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config.errors import show, show_key

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def check_selector(selector: Any, path: str) -> dict:
    """The selector as a dict, or ValueError naming the bad part (``path`` prefixes it)."""
    if selector is None:
        return {}
    if not isinstance(selector, dict):
        raise ValueError(f"{path}: expected a label selector object, got {type(selector).__name__} {show(selector)}")
    for key in selector:
        if key not in ("matchLabels", "matchExpressions"):
            raise ValueError(f"{path}.{show_key(key)}: unknown key; accepted: matchLabels, matchExpressions")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{path}.matchLabels: expected an object of label: value, got {show(labels)}")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}.matchLabels.{show_key(key)}: {show(value)} is not a string label value")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise ValueError(f"{path}.matchExpressions: expected a list, got {show(expressions)}")
    for i, expr in enumerate(expressions):
        where = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            raise ValueError(f"{where}: expected an object with key, operator, values; got {show(expr)}")
        if not isinstance(expr.get("key"), str) or not expr["key"]:
            raise ValueError(f"{where}.key: {show(expr.get('key'))} is not a label key")
        if expr.get("operator") not in OPERATORS:
            raise ValueError(f"{where}.operator: {show(expr.get('operator'))} is not accepted; "
                             f"accepted: {', '.join(OPERATORS)}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.values: {show(values)} is not a list of strings")
        if (expr["operator"] in ("In", "NotIn")) != bool(values):
            raise ValueError(f"{where}.values: required and non-empty for In/NotIn, forbidden for "
                             f"Exists/DoesNotExist (operator is {expr['operator']})")
    return selector


def selector_matches(selector: Mapping | None, labels: Mapping | None) -> bool:
    """Kubernetes label selector semantics; an empty selector matches everything."""
    selector = selector or {}
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
