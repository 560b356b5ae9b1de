"""PromQL and Grafana, as far as the stack tests need them.

- ``promql_names``: the metric names and label names a PromQL expression uses
  (a small tokenizer, not a full parser: selectors, matchers, grouping clauses,
  and the labels ``label_replace``/``label_join``/``count_values`` create).
- ``dashboard_queries``: every Prometheus query of every panel of a Grafana
  dashboard, rows and collapsed rows included.
- ``Prometheus``: the HTTP API calls the tests make, and Grafana's template
  variables resolved the way Grafana resolves them, against that Prometheus.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

# ---------------------------------------------------------------------------
# PromQL

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+(?![\w.]))
  | (?P<number>(?:0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)(?![\w.]))
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},@])
  | (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
    """,
    re.VERBOSE,
)

_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"bool", "and", "or", "unless", "offset", "inf", "nan", "start", "end", "atan2"}
# functions whose string arguments name labels: the first one is the label they create, and for
# label_replace the third, for label_join the third and later, are labels they read
_LABEL_FUNCTIONS = {"label_replace", "label_join", "count_values"}


@dataclass
class PromqlNames:
    """What an expression refers to."""

    metrics: set[str] = field(default_factory=set)
    # labels that must exist: in ``by``/``on``/... clauses and in matchers that cannot match an absent label
    labels: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)  # labels the expression makes itself


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 20]!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def _unquote(text: str) -> str:
    body = text[1:-1]
    return body if text[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def _matches_empty(op: str, value: str) -> bool:
    """Would the matcher ``label op value`` select a series that lacks the label?"""
    if op == "=":
        return value == ""
    if op == "!=":
        return value != ""
    try:
        matched = re.fullmatch(value, "") is not None
    except re.error:
        return True
    return matched if op == "=~" else not matched


def promql_names(expr: str) -> PromqlNames:
    """The metric names, required label names and created label names of ``expr``."""
    names = PromqlNames()
    tokens = _tokens(expr)
    calls: list[tuple[str, int]] = []  # open calls: function name, strings seen so far
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "ident" and text in _GROUPING and following == "(":
            index += 2
            while index < len(tokens) and tokens[index][1] != ")":
                if tokens[index][0] == "ident":
                    names.labels.add(tokens[index][1])
                index += 1
        elif kind == "ident" and following in ("by", "without"):
            pass  # an aggregation written `sum by (...) (...)`
        elif kind == "ident" and following == "(" and text not in _KEYWORDS:
            calls.append((text, 0))
            index += 2
            continue
        elif kind == "ident" and text not in _KEYWORDS:
            names.metrics.add(text)
        elif kind == "op" and text == "{":
            index = _matchers(tokens, index + 1, names)
        elif kind == "op" and text == "(":
            calls.append(("", 0))
        elif kind == "op" and text == ")" and calls:
            calls.pop()
        elif kind == "string" and calls:
            function, seen = calls[-1]
            if function in _LABEL_FUNCTIONS and seen == 0:
                names.created.add(_unquote(text))
            elif (function == "label_replace" and seen == 2) or (function == "label_join" and seen >= 2):
                names.labels.add(_unquote(text))
            calls[-1] = (function, seen + 1)
        index += 1
    return names


def _matchers(tokens: list[tuple[str, str]], index: int, names: PromqlNames) -> int:
    """Read ``label op "value", ...}`` from ``index``; returns the index of the closing brace."""
    while index < len(tokens) and tokens[index][1] != "}":
        if tokens[index][0] == "ident" and index + 2 < len(tokens) and tokens[index + 2][0] == "string":
            label, op, value = tokens[index][1], tokens[index + 1][1], _unquote(tokens[index + 2][1])
            if label == "__name__" and op == "=":
                names.metrics.add(value)
            elif label != "__name__" and not _matches_empty(op, value):
                names.labels.add(label)
            index += 3
        else:
            index += 1
    return index


# ---------------------------------------------------------------------------
# Grafana dashboards


@dataclass
class PanelQuery:
    """One Prometheus query of one panel."""

    panel: str  # the panel's title (and id)
    ref: str  # the query's refId
    expr: str
    instant: bool

    def describe(self) -> str:
        return f"panel {self.panel}, query {self.ref}: {self.expr}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a row's panels (collapsed rows keep them here)


def _datasource_type(datasource: Any) -> str | None:
    if isinstance(datasource, dict):
        value = datasource.get("type")
        return value if isinstance(value, str) else None
    return None


def dashboard_queries(dashboard: Mapping[str, Any]) -> tuple[list[PanelQuery], list[str]]:
    """Every Prometheus query of the dashboard's panels, and the panels' other queries (skipped)."""
    queries: list[PanelQuery] = []
    others: list[str] = []
    for panel in _panels(list(dashboard.get("panels") or [])):
        title = f"{panel.get('title')!r} (id {panel.get('id')})"
        panel_type = _datasource_type(panel.get("datasource"))
        for target in panel.get("targets") or []:
            kind = _datasource_type(target.get("datasource")) or panel_type
            ref = str(target.get("refId", "?"))
            if (
                kind in (None, "prometheus")
                and isinstance(target.get("expr"), str)
                and target["expr"].strip()
            ):
                instant = bool(target.get("instant")) and not target.get("range")
                queries.append(PanelQuery(title, ref, target["expr"], instant))
            else:
                others.append(f"panel {title}, query {ref} ({kind or 'no datasource type'})")
    return queries, others


# Grafana's built-in variables, for a dashboard looking at the last 15 minutes of a
# Prometheus scraped every second (Grafana's $__rate_interval is at least 4 scrape intervals).
BUILTINS = {
    "__rate_interval_ms": "60000",
    "__rate_interval": "1m",
    "__interval_ms": "15000",
    "__interval": "15s",
    "__range_ms": "900000",
    "__range_s": "900",
    "__range": "15m",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``$name``, ``${name}``, ``${name:format}`` and ``[[name]]`` replaced; unknown names kept."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(5)
        return values.get(name, match.group(0))

    return _VARIABLE.sub(replace, text)


def regex_all(values: list[str]) -> str:
    """Grafana's value of a multi-value or "All" variable in a Prometheus query: ``(a|b|c)``."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


# ---------------------------------------------------------------------------
# Prometheus


class QueryError(Exception):
    """Prometheus refused a query (bad syntax, unknown function)."""


class Prometheus:
    """The HTTP API of one Prometheus server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str, params: Mapping[str, Any]) -> Any:
        response = self.http.get(path, params=params)
        body = response.json()
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        return list(self._get("/api/v1/query", params)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
        return list(data["result"])

    def metric_names(self) -> set[str]:
        return set(self._get("/api/v1/label/__name__/values", {}))

    def label_names(self, metric: str) -> set[str]:
        """Every label name on the series of ``metric`` (the metric's name itself included)."""
        return set(self._get("/api/v1/labels", {"match[]": metric}))

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        params = {"match[]": match} if match else {}
        return sorted(self._get(f"/api/v1/label/{label}/values", params))

    def series(self, match: str) -> list[dict[str, str]]:
        return list(self._get("/api/v1/series", {"match[]": match}))

    def targets(self) -> dict[str, str]:
        """Scrape URL -> health (``up``, ``down``, ``unknown`` until first scraped) of every target."""
        targets = self._get("/api/v1/targets", {"state": "active"})["activeTargets"]
        return {target["scrapeUrl"]: target["health"] for target in targets}

    def targets_up(self) -> bool:
        """Has every scrape target been scraped, successfully?"""
        health = self.targets()
        return bool(health) and set(health.values()) == {"up"}

    def alertmanagers(self) -> list[str]:
        return [am["url"] for am in self._get("/api/v1/alertmanagers", {})["activeAlertmanagers"]]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules", {})["groups"] for rule in group["rules"]]

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/query_exemplars", {"query": expr, "start": start, "end": end}))

    def variable_values(self, variable: Mapping[str, Any], values: Mapping[str, str]) -> list[str]:
        """The options of a Grafana template variable, as Grafana would list them."""
        kind = variable.get("type")
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        query = substitute(str(query or ""), values)
        if kind == "custom":
            options = [o.get("value") for o in variable.get("options") or [] if o.get("value") != "$__all"]
            found = [str(o) for o in options if o] or [v.strip() for v in query.split(",") if v.strip()]
        elif kind in ("constant", "textbox"):
            found = [query]
        elif kind == "interval":
            found = [v.strip() for v in query.split(",") if v.strip()][:1]
        elif kind == "query":
            found = self._variable_query(query)
        else:
            raise QueryError(f"variable type {kind!r} is not supported by this test")
        pattern = variable.get("regex")
        if pattern:
            found = _apply_regex(str(pattern), found)
        return found

    def _variable_query(self, query: str) -> list[str]:
        match = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?([a-zA-Z_]\w*)\s*\)\s*", query, re.DOTALL)
        if match:
            return self.label_values(match.group(2), match.group(1))
        match = re.fullmatch(r"\s*label_names\(\s*(.*?)\s*\)\s*", query, re.DOTALL)
        if match:
            return sorted(self._get("/api/v1/labels", {"match[]": match.group(1)} if match.group(1) else {}))
        match = re.fullmatch(r"\s*metrics\(\s*(.*?)\s*\)\s*", query, re.DOTALL)
        if match:
            return sorted(n for n in self.metric_names() if re.search(match.group(1), n))
        match = re.fullmatch(r"\s*query_result\(\s*(.*)\s*\)\s*", query, re.DOTALL)
        if match:
            lines = []
            for sample in self.query(match.group(1)):
                metric = dict(sample["metric"])
                name = metric.pop("__name__", "")
                labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()))
                lines.append(f"{name}{{{labels}}} {sample['value'][1]} {sample['value'][0]}")
            return lines
        raise QueryError(f"cannot evaluate the variable query {query!r}")


def _apply_regex(pattern: str, values: list[str]) -> list[str]:
    """Grafana's ``regex`` of a variable: keep matching values; a capture group extracts a part."""
    body = pattern
    if len(pattern) > 1 and pattern.startswith("/") and pattern.rfind("/") > 0:
        body = pattern[1 : pattern.rfind("/")]
    compiled = re.compile(body)
    kept: list[str] = []
    for value in values:
        match = compiled.search(value)
        if match is None:
            continue
        groups = match.groupdict()
        extracted = groups.get("value") or groups.get("text") or (match.group(1) if match.groups() else value)
        if extracted not in kept:
            kept.append(extracted)
    return kept


def has_data(result: list[dict[str, Any]]) -> bool:
    """A query result with at least one number that is not NaN."""
    for series in result:
        samples = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(not math.isnan(float(value)) for _, value in samples):
            return True
    return False
