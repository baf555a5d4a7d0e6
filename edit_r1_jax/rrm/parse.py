"""RRM output -> typed result (per-principle verdicts, average, final score, status). Never raises.

Output layout (algorithms.md §c2, decision e20; see `edit_r1_jax.rrm.prompts.format_assistant_output`)::

    <reasoning> \\n\\n [{"question": ..., "score": 0|1}, ...] {"average_score": a} <score>s</score>

Rules (decisions c2 / e6):

* **score**: the number in the *last* ``<score> x </score>`` tag; the closing tag may be written ``</score>`` or
  ``<\\score>`` with stray whitespace anywhere inside the tags; an optional ``/10`` after the number is accepted.
  The value is clamped to [0, 10] -> ``status="ok"``.
* **fallback**: without a closed score tag, the score is ``10 * average`` -> ``status="fallback_average"``, where
  ``average`` is the ``"average_score"`` value (a value in (1, 10] is read as already being on the 0-10 scale and
  divided by 10; a fraction ``a/b`` is evaluated), or, when that is missing too, the mean of the verdicts provided
  that every expected verdict was parsed (``num_principles`` of them when given).
* **failed**: neither is available -> ``score=None``.
* **verdicts**: the ``"score"`` values of the objects in the last ``[{ ... }]`` list before the average/score
  (1/1.0/true/yes -> 1, 0/0.0/false/no -> 0, anything else -> None), in order; with ``num_principles`` given the
  list is cut or padded with None to that length (verdicts are matched to the principles by position). A truncated
  list yields the entries that survived.
* **truncation**: a number that runs into the end of the text (an average, or the value of an unterminated list
  entry) is not trusted, since "0.6" cut to "0" would read as a different value.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParseResult", "parse", "parse_principles", "STATUSES"]

STATUSES = ("ok", "fallback_average", "failed")

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_TAG_RE = re.compile(
    r"<\s*score\s*>\s*(" + _NUM + r")\s*(?:/\s*10(?:\.0*)?\s*)?<\s*[\\/]\s*score\s*>", re.IGNORECASE)
_AVG_RE = re.compile(
    r"[\"']?average[_ ]score[\"']?\s*[:=]\s*[\"']?\s*(" + _NUM + r")(?:\s*/\s*(" + _NUM + r"))?", re.IGNORECASE)
_LIST_START_RE = re.compile(r"\[\s*\{")
_OBJECT_RE = re.compile(r"\{[^{}]*(?:\}|$)")
_SCORE_KEY_RE = re.compile(r"[\"']score[\"']\s*:\s*[\"']?\s*([A-Za-z]+|" + _NUM + r")")
_BARE_SCORE_KEY_RE = re.compile(r"(?<![\w\"'])score\s*:\s*[\"']?\s*([A-Za-z]+|" + _NUM + r")", re.IGNORECASE)
_QUESTION_RE = re.compile(r"[\"']question[\"']\s*:\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')", re.DOTALL)
_BARE_LIST_RE = re.compile(r"\[\s*([01](?:\.0)?(?:\s*,\s*[01](?:\.0)?)*)\s*\]")

_TRUE = {"1", "1.0", "1.", "true", "yes"}
_FALSE = {"0", "0.0", "0.", "false", "no"}


@dataclass(frozen=True)
class ParseResult:
    """One parsed RRM output.

    score: final score in [0, 10], or None when ``status == "failed"``.
    verdicts: per-principle 0/1/None (length ``num_principles`` when it was given).
    average: average_score in [0, 1] (or the mean of complete verdicts), or None.
    status: "ok" (closed score tag) | "fallback_average" (10 * average) | "failed".
    raw_score: the tag's number before clamping (None without a tag).
    questions: question texts of the parsed list entries (None where an entry had none).
    """
    score: float | None
    verdicts: list = field(default_factory=list)
    average: float | None = None
    status: str = "failed"
    raw_score: float | None = None
    questions: list = field(default_factory=list)


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _find_score(text: str) -> tuple[float | None, int]:
    """(value of the last closed score tag, its start index) or (None, -1)."""
    last = None
    for m in _SCORE_TAG_RE.finditer(text):
        try:
            v = float(m.group(1))
        except ValueError:
            continue
        if _finite(v):
            last = (v, m.start())
    return last if last is not None else (None, -1)


def _find_average(text: str) -> tuple[float | None, int]:
    """(average normalised to [0, 1], start index) of the last average_score, or (None, -1)."""
    last = (None, -1)
    for m in _AVG_RE.finditer(text):
        if m.end() == len(text):
            continue  # the number runs into the end of the text: possibly truncated ("0.6" -> "0")
        try:
            v = float(m.group(1))
            if m.group(2) is not None:
                den = float(m.group(2))
                if not (_finite(den) and den > 0):
                    continue
                v = v / den
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        if not _finite(v):
            continue
        if 0.0 <= v <= 1.0:
            last = (v, m.start())
        elif 1.0 < v <= 10.0:
            last = (v / 10.0, m.start())
        else:
            last = (None, m.start())
    return last


def _verdict(token: str) -> int | None:
    t = token.strip().lower()
    if t in _TRUE:
        return 1
    if t in _FALSE:
        return 0
    return None


def _decode_question(q: str) -> str:
    if q.startswith('"'):
        try:
            return json.loads(q)
        except (ValueError, RecursionError):
            return q[1:-1]
    return q[1:-1].replace("\\'", "'")


def _find_points(text: str, end: int) -> tuple[list, list]:
    """(verdicts, questions) of the last point list that starts before ``end``."""
    region_end = end if end >= 0 else len(text)
    starts = [m.start() for m in _LIST_START_RE.finditer(text, 0, region_end)]
    verdicts, questions = [], []
    if starts:
        region = text[starts[-1]:region_end]
        for m in _OBJECT_RE.finditer(region):
            obj = m.group(0)
            keys = list(_SCORE_KEY_RE.finditer(obj)) or list(_BARE_SCORE_KEY_RE.finditer(obj))
            q = _QUESTION_RE.search(obj)
            if not keys and q is None:
                continue
            if not obj.endswith("}") and (not keys or keys[-1].end() == len(obj)):
                break  # truncated inside the last entry, before its score or inside its value
            verdicts.append(_verdict(keys[-1].group(1)) if keys else None)
            questions.append(_decode_question(q.group(1)) if q else None)
        if verdicts:
            return verdicts, questions
    bare = list(_BARE_LIST_RE.finditer(text, 0, region_end))
    if bare:
        vals = [_verdict(v) for v in bare[-1].group(1).split(",")]
        return vals, [None] * len(vals)
    return [], []


def _parse(text: Any, num_principles: int | None) -> ParseResult:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    n = None
    if num_principles is not None:
        n = int(num_principles)
        if n < 0:
            raise ValueError(f"num_principles must be >= 0, got {num_principles}")

    raw_score, score_at = _find_score(text)
    average, avg_at = _find_average(text)
    candidates = [i for i in (avg_at, score_at) if i >= 0]
    list_end = min(candidates) if candidates else -1
    verdicts, questions = _find_points(text, list_end)

    complete = bool(verdicts) and all(v is not None for v in verdicts) and (n is None or len(verdicts) >= n)
    if n is not None:
        verdicts = (verdicts + [None] * n)[:n]
        questions = (questions + [None] * n)[:n]
    if average is None and complete and verdicts:
        average = sum(verdicts) / len(verdicts)

    if raw_score is not None:
        return ParseResult(min(max(raw_score, 0.0), 10.0), verdicts, average, "ok", raw_score, questions)
    if average is not None:
        return ParseResult(min(max(10.0 * average, 0.0), 10.0), verdicts, average, "fallback_average", None,
                           questions)
    return ParseResult(None, verdicts, None, "failed", None, questions)


def parse(text: Any, num_principles: int | None = None) -> ParseResult:
    """Parse one generated RRM text. Never raises: anything unexpected gives ``status="failed"``.

    With ``num_principles`` the verdict list has exactly that length (padded with None / cut).
    """
    try:
        return _parse(text, num_principles)
    except Exception:  # noqa: BLE001 - the contract is "never raises"
        try:
            n = max(int(num_principles), 0) if num_principles is not None else 0
        except Exception:  # noqa: BLE001
            n = 0
        return ParseResult(None, [None] * n, None, "failed", None, [None] * n)


_CATEGORY_ALIASES = {
    "follow": "Follow", "instruction following": "Follow", "instruction-following": "Follow",
    "keep": "Keep", "feature preservation": "Keep", "preservation": "Keep", "consistency": "Keep",
    "quality": "Quality", "image quality": "Quality",
}


def _principle_items(text: str) -> list:
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        chunk = text[start:end + 1]
        for loader in (json.loads, ast.literal_eval):
            try:
                val = loader(chunk)
            except Exception:  # noqa: BLE001 - json/ast raise many types on junk
                continue
            if isinstance(val, list):
                return val
    items = []
    for m in _OBJECT_RE.finditer(text):
        obj = m.group(0)
        q = _QUESTION_RE.search(obj)
        c = re.search(r"[\"']category[\"']\s*:\s*[\"']([^\"']*)[\"']", obj)
        if q:
            items.append({"question": _decode_question(q.group(1)), "category": c.group(1) if c else None})
    return items


def parse_principles(text: Any) -> list[dict] | None:
    """Decomposition output -> ``[{"question": str, "category": "Follow"|"Keep"|"Quality"}, ...]`` or None.

    Accepts a JSON (or Python-literal) array anywhere in the text, or loose objects; category names of the paper
    ("Instruction Following", "Feature Preservation", "Image Quality") map to ours. Entries without a question or
    with an unknown category are dropped; None when nothing valid remains. Never raises.
    """
    try:
        if not isinstance(text, str):
            return None
        out = []
        for item in _principle_items(text):
            if not isinstance(item, dict):
                continue
            q = item.get("question")
            cat = _CATEGORY_ALIASES.get(str(item.get("category", "")).strip().lower())
            if isinstance(q, str) and q.strip() and cat:
                out.append({"question": q.strip(), "category": cat})
        return out or None
    except Exception:  # noqa: BLE001
        return None
