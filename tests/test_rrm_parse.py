"""RRM output parser: golden cases (paper Appendix B layout among them) and hypothesis fuzzing (never raises)."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edit_r1_jax.rrm.parse import STATUSES, ParseResult, parse, parse_principles
from edit_r1_jax.rrm.prompts import format_assistant_output

# The Appendix B layout: free-form analysis of 10 points (two fail), the average, the final judgement, then the
# summary block with the per-point list, the average object and the score tag. Wording is ours.
APPENDIX_B_STYLE = """Now I need to go through the evaluation points for this edit, one at a time.
1. Is the facade rebuilt in a traditional Chinese style? The roof now has curved eaves and red columns, so 1.
2. Are the roof tiles glazed in the Chinese manner? Yes, they are, 1.
3. Does the entrance carry Chinese decorative elements? There are lanterns and a plaque, 1.
4. Is the overall colour scheme typical of that style? Red and gold dominate, 1.
5. Is the building's footprint the same? It matches the original, 1.
6. Is the white car in front unchanged? Its shape changed into a different model, 0.
7. Is the car's position unchanged? It moved to the left, 0.
8. Is the street layout preserved? Yes, 1.
9. Is the image free of distortions? Yes, 1.
10. Is the lighting natural? Yes, 1.
Average: (1+1+1+1+1+0+0+1+1+1)/10 = 0.8. The style change is convincing, but the car changed, which would take some
work to fix, so it can be given a 7.

[{'question': 'Is the facade rebuilt in a traditional Chinese style?', 'score': 1}, {'question': 'Are the roof tiles glazed in the Chinese manner?', 'score': 1}, {'question': 'Does the entrance carry Chinese decorative elements?', 'score': 1}, {'question': 'Is the overall colour scheme typical of that style?', 'score': 1}, {'question': "Is the building's footprint the same?", 'score': 1}, {'question': 'Is the white car in front unchanged?', 'score': 0}, {'question': "Is the car's position unchanged?", 'score': 0}, {'question': 'Is the street layout preserved?', 'score': 1}, {'question': 'Is the image free of distortions?', 'score': 1}, {'question': 'Is the lighting natural?', 'score': 1}], {"average_score": 0.8} <score> 7 <\\score>"""
B_VERDICTS = [1, 1, 1, 1, 1, 0, 0, 1, 1, 1]


def _valid(verdicts=(1, 0, 1), score=6.5, reasoning="Checking the points.\n1. yes\n2. no\n3. yes"):
    qs = [f"Question {i} with a comma, a 'quote' and \"double quotes\"?" for i in range(len(verdicts))]
    return format_assistant_output(reasoning, qs, list(verdicts), score)


def test_appendix_b_layout():
    r = parse(APPENDIX_B_STYLE, num_principles=10)
    assert r == ParseResult(7.0, B_VERDICTS, 0.8, "ok", 7.0, r.questions)
    assert r.questions[4] == "Is the building's footprint the same?"
    assert parse(APPENDIX_B_STYLE).verdicts == B_VERDICTS


def test_our_format_round_trip():
    text = _valid((1, 0, 1, 1), 7.5)
    r = parse(text, num_principles=4)
    assert (r.score, r.verdicts, r.average, r.status) == (7.5, [1, 0, 1, 1], 0.75, "ok")
    assert r.questions[0] == "Question 0 with a comma, a 'quote' and \"double quotes\"?"
    bare = format_assistant_output("", None, [0, 1], 4)
    assert parse(bare, 2) == ParseResult(4.0, [0, 1], 0.5, "ok", 4.0, [None, None])


@pytest.mark.parametrize("tag,score", [
    ("<score>7</score>", 7.0), ("<score>7<\\score>", 7.0), ("< score > 7.5 < / score >", 7.5),
    ("<SCORE>\n 3 \n</SCORE>", 3.0), ("<score>8/10</score>", 8.0), ("<score>7.</score>", 7.0),
    ("<score>.5</score>", 0.5), ("<score>12</score>", 10.0), ("<score>-2</score>", 0.0),
    ("<score>10.0</score>", 10.0), ("<score>0</score>", 0.0),
])
def test_score_tag_variants(tag, score):
    r = parse(f"some reasoning\n\n[{{\"question\": \"q\", \"score\": 1}}]\n{{\"average_score\": 1}}\n{tag}", 1)
    assert r.status == "ok" and r.score == score and r.verdicts == [1]


def test_clamping_keeps_the_raw_value():
    r = parse("<score>12.5</score>")
    assert (r.score, r.raw_score, r.status) == (10.0, 12.5, "ok")


def test_last_score_tag_wins():
    r = parse("draft <score>3</score> ... on reflection the final answer: <score>6</score>")
    assert r.score == 6.0


def test_fallback_to_average():
    r = parse('[{"question": "a", "score": 1}, {"question": "b", "score": 0}]\n{"average_score": 0.5}\n<score>', 2)
    assert (r.status, r.score, r.average, r.verdicts) == ("fallback_average", 5.0, 0.5, [1, 0])
    assert parse('{"average_score": 8}').average == 0.8          # written on a 0-10 scale
    assert parse('"average_score": 7/10,').score == pytest.approx(7.0)
    assert parse('{"average_score": 0.6').status == "failed"      # runs into the end: maybe cut from 0.65
    assert parse('{"average_score": 35}').status == "failed"      # nonsense average


def test_fallback_to_complete_verdicts_only():
    text = '[{"question": "a", "score": 1}, {"question": "b", "score": 1}, {"question": "c", "score": 0}]'
    r = parse(text, 3)
    assert (r.status, r.average, r.verdicts) == ("fallback_average", pytest.approx(2 / 3), [1, 1, 0])
    r = parse(text, 4)                                             # a principle is missing: not complete
    assert (r.status, r.score, r.verdicts) == ("failed", None, [1, 1, 0, None])


def test_missing_json_with_score_is_ok():
    r = parse("The edit looks right to me.\n<score>9</score>", num_principles=3)
    assert (r.status, r.score, r.verdicts, r.average) == ("ok", 9.0, [None, None, None], None)


def test_verdict_values():
    text = ('[{"question": "a", "score": "1"}, {"question": "b", "score": 0.0}, {"question": "c", "score": true}, '
            '{"question": "d", "score": "no"}, {"question": "e", "score": 0.5}, {"question": "f", "score": 7}]')
    assert parse(text).verdicts == [1, 0, 1, 0, None, None]
    assert parse(text, 3).verdicts == [1, 0, 1]
    assert parse(text, 8).verdicts == [1, 0, 1, 0, None, None, None, None]


def test_question_text_mentioning_score_is_not_a_verdict():
    text = ('[{"question": "Is the \\"score\\": 9 sign readable?", "score": 0}]\n{"average_score": 0}\n'
            "<score>1</score>")
    assert parse(text, 1).verdicts == [0]


def test_every_truncation_of_a_valid_output():
    text = _valid((1, 0, 1, 1, 0), 6.5)
    tag_end = text.rindex(">") + 1
    for cut in range(len(text) + 1):
        r = parse(text[:cut], num_principles=5)
        assert r.status in STATUSES and len(r.verdicts) == 5
        if cut >= tag_end:
            assert (r.status, r.score, r.verdicts) == ("ok", 6.5, [1, 0, 1, 1, 0])
        else:
            assert r.status != "ok"
            assert r.score is None or r.score == pytest.approx(6.0)   # fallback: 10 * average 0.6
            parsed = [v for v in r.verdicts if v is not None]
            assert parsed == [1, 0, 1, 1, 0][:len(parsed)]            # never a wrong verdict, only missing ones


@pytest.mark.parametrize("bad", [None, 7, 3.5, ["<score>7</score>"], {"a": 1}, object()])
def test_non_text_inputs_fail_quietly(bad):
    r = parse(bad, num_principles=2)
    assert (r.status, r.score, r.verdicts) == ("failed", None, [None, None])


def test_bytes_and_bad_num_principles():
    assert parse(b"<score>4</score>").score == 4.0
    r = parse("<score>4</score>", num_principles=-1)
    assert r.status == "failed" and r.verdicts == []
    assert parse("<score>4</score>", num_principles="x").status == "failed"


def test_parse_principles():
    text = ('Here you go:\n[{"question": "Is the cup red?", "category": "Instruction Following"}, '
            '{"question": "Is the table unchanged?", "category": "keep"}, {"question": "", "category": "Keep"}, '
            '{"question": "Sharp?", "category": "Image Quality"}, {"question": "Odd?", "category": "Other"}]')
    assert parse_principles(text) == [{"question": "Is the cup red?", "category": "Follow"},
                                      {"question": "Is the table unchanged?", "category": "Keep"},
                                      {"question": "Sharp?", "category": "Quality"}]
    assert parse_principles("[{'question': 'A?', 'category': 'Follow'}]") == [{"question": "A?", "category": "Follow"}]
    loose = ('{"question": "A?", "category": "Follow"} and {"question": "B?", "category": "Keep"} '
             '{"question": "C?", "cat')
    assert parse_principles(loose) == [{"question": "A?", "category": "Follow"}, {"question": "B?", "category": "Keep"}]
    assert parse_principles("no json here") is None and parse_principles(None) is None


# ------------------------------------------------------------------------------------------------------------------
# Fuzzing: >= 2,000 random and mutated outputs in total (400 x 3 random, 400 x 2 mutated, 300 stray-text cases);
# invariants must hold and nothing may raise. Several outputs per example keep hypothesis' overhead low.
# ------------------------------------------------------------------------------------------------------------------
def _check_invariants(r, n):
    assert isinstance(r, ParseResult)
    assert r.status in STATUSES
    assert (r.score is None) == (r.status == "failed")
    if r.score is not None:
        assert 0.0 <= r.score <= 10.0 and math.isfinite(r.score)
    if r.average is not None:
        assert 0.0 <= r.average <= 1.0
    assert all(v in (0, 1, None) for v in r.verdicts)
    if n is not None:
        assert len(r.verdicts) == n and len(r.questions) == n


ALPHABET = st.sampled_from(list("<>/\\{}[]\"':,. \n\t0123456789-+") + ["score", "average_score", "question",
                                                                         "<score>", "</score>", "<\\score>", "1",
                                                                         "0", "yes", "no", "\u00e9", "\U0001f600"])
N = st.one_of(st.none(), st.integers(0, 12))
FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
RANDOM_TEXT = st.one_of(st.text(max_size=200), st.lists(ALPHABET, max_size=80).map("".join))


@FUZZ
@given(st.lists(RANDOM_TEXT, min_size=3, max_size=3), N)
def test_fuzz_random_text(texts, n):
    for text in texts:
        _check_invariants(parse(text, n), n)


@st.composite
def mutated_outputs(draw):
    k = draw(st.integers(1, 10))
    verdicts = draw(st.lists(st.integers(0, 1), min_size=k, max_size=k))
    score = draw(st.floats(0, 10).map(lambda x: round(x, 2)))
    text = _valid(verdicts, score, draw(st.text(max_size=60)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "dup", "swap_tag"]))
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 30)))
        if op == "truncate":
            text = text[:i]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.lists(ALPHABET, max_size=6).map("".join)) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(st.text(max_size=8)) + text[j:]
        elif op == "dup":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text.replace("</score>", draw(st.sampled_from(["<\\score>", "</ score>", "</scor>", ""])))
    return text, k


@FUZZ
@given(st.lists(mutated_outputs(), min_size=2, max_size=2), st.booleans())
def test_fuzz_mutated_outputs(samples, give_n):
    for text, k in samples:
        n = k if give_n else None
        _check_invariants(parse(text, n), n)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 1), min_size=1, max_size=10), st.integers(0, 100),
       st.text(max_size=80).filter(lambda s: "score" not in s.lower()), st.text(max_size=80).filter(
           lambda s: "score" not in s.lower() and "[" not in s))
def test_fuzz_stray_text_around_a_valid_output(verdicts, score10, prefix, suffix):
    """Text before or after a complete output never changes its score or verdicts."""
    text = _valid(verdicts, score10 / 10)
    r = parse(prefix + text + suffix, len(verdicts))
    assert (r.status, r.score, r.verdicts) == ("ok", score10 / 10, verdicts)
