"""Routing: a pure function from a series' header values (and calling AE) to the rules that fire.

Condition grammar, per key (a DICOM keyword, or `calling_ae`):
  CT                      equal, case-insensitive (any value of a multi-valued element may match)
  [CHEST, LUNG]           any of
  "<=2.5" ">3" "==1" "!=0"  numeric comparison
  {regex: "^AX.*LUNG"}    regular expression search, case-insensitive
  {present: false}        the element is absent or empty
A rule fires when every condition holds. Every decision carries the reason of each condition, so
`dicom-ai-node test-rule` can show an operator exactly why a rule did or did not fire.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

_COMPARISON = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9]+(?:\.[0-9]+)?)\s*$")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}


@dataclass(frozen=True)
class Condition:
    key: str
    describe: str
    test: Callable[[list[str]], bool]


@dataclass(frozen=True)
class ConditionOutcome:
    key: str
    expected: str
    actual: str
    holds: bool


@dataclass(frozen=True)
class RuleDecision:
    rule: str
    fires: bool
    pipelines: tuple[str, ...]
    destinations: tuple[str, ...] | None
    priority: int
    outcomes: tuple[ConditionOutcome, ...]

    def explain(self) -> str:
        verdict = "FIRES" if self.fires else "does not fire"
        lines = [f"rule {self.rule!r} {verdict} (pipelines: {', '.join(self.pipelines)})"]
        for o in self.outcomes:
            mark = "ok " if o.holds else "NO "
            lines.append(f"  {mark} {o.key}: is {o.actual}, wanted {o.expected}")
        return "\n".join(lines)


def _numbers(values: list[str]) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            pass
    return out


def parse_condition(key: str, spec: Any) -> Condition:
    """Turn one `key: spec` of a rule into a Condition; raises ValueError naming the key on bad syntax."""
    if isinstance(spec, Mapping):
        if set(spec) == {"regex"}:
            try:
                pattern = re.compile(str(spec["regex"]), re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"{key}: bad regex {spec['regex']!r}: {exc}") from exc
            return Condition(key, f"/{pattern.pattern}/", lambda vs: any(pattern.search(v) for v in vs + ["\\".join(vs)]))
        if set(spec) == {"present"} and isinstance(spec["present"], bool):
            want = spec["present"]
            return Condition(key, "present" if want else "absent", lambda vs: bool(vs) == want)
        raise ValueError(f"{key}: a mapping condition must be {{regex: ...}} or {{present: true|false}}, got {dict(spec)}")
    if isinstance(spec, list):
        if not spec or any(isinstance(s, (Mapping, list)) for s in spec):
            raise ValueError(f"{key}: a list condition must be a non-empty list of plain values")
        wanted = {str(s).strip().upper() for s in spec}
        return Condition(key, f"one of {sorted(wanted)}", lambda vs: any(v.strip().upper() in wanted for v in vs))
    if isinstance(spec, str) and (m := _COMPARISON.match(spec)):
        op, limit = _OPERATORS[m.group(1)], float(m.group(2))
        return Condition(key, f"{m.group(1)} {m.group(2)}", lambda vs: any(op(x, limit) for x in _numbers(vs)))
    if isinstance(spec, (str, int, float)) and not isinstance(spec, bool):
        wanted_one = str(spec).strip().upper()
        if isinstance(spec, (int, float)):
            return Condition(key, f"== {spec}", lambda vs: any(x == float(spec) for x in _numbers(vs)))
        return Condition(key, repr(str(spec)), lambda vs: any(v.strip().upper() == wanted_one for v in vs))
    raise ValueError(f"{key}: unsupported condition {spec!r}")


def header_values(header: Mapping[str, Any], key: str) -> list[str]:
    """The values of `key` in a flat header mapping, as strings (multi-valued elements give several)."""
    value = header.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [str(value)]


def evaluate_rule(rule: Any, header: Mapping[str, Any], calling_ae: str) -> RuleDecision:
    """Decide one rule (a config.Rule) against a series header."""
    facts = dict(header)
    facts["calling_ae"] = calling_ae
    outcomes = []
    for key, spec in rule.match.items():
        condition = parse_condition(key, spec)
        values = header_values(facts, key)
        holds = condition.test(values)
        actual = "absent" if not values else "\\".join(values)
        outcomes.append(ConditionOutcome(key, condition.describe, repr(actual) if values else actual, holds))
    return RuleDecision(
        rule=rule.name,
        fires=all(o.holds for o in outcomes),
        pipelines=tuple(rule.pipelines),
        destinations=tuple(rule.destinations) if rule.destinations is not None else None,
        priority=rule.priority,
        outcomes=tuple(outcomes),
    )


def route(rules: Sequence[Any], header: Mapping[str, Any], calling_ae: str) -> list[RuleDecision]:
    """Every rule's decision, firing rules first by descending priority, then in file order."""
    decisions = [evaluate_rule(rule, header, calling_ae) for rule in rules]
    order = sorted(range(len(decisions)), key=lambda i: (not decisions[i].fires, -decisions[i].priority, i))
    return [decisions[i] for i in order]


@dataclass(frozen=True)
class Assignment:
    """One pipeline to run on a series, and where its results go (None: the default destination)."""

    pipeline: str
    rule: str
    destinations: tuple[str, ...] | None


def assignments(decisions: Iterable[RuleDecision]) -> list[Assignment]:
    """Pipelines to run: each at most once, taken from the highest-priority rule that names it."""
    chosen: dict[str, Assignment] = {}
    for decision in decisions:
        if decision.fires:
            for name in decision.pipelines:
                chosen.setdefault(name, Assignment(name, decision.rule, decision.destinations))
    return list(chosen.values())
