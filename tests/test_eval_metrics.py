"""Eval metrics and extraction against closed-form references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmdistill.checking.extract import choice_letter, code_block, final_number, last_boxed, strip_think
from llmdistill.eval.metrics import (
    default_ks,
    maj_at_k,
    majority_correct,
    paired_difference,
    pass_at_1,
    pass_at_k,
    summarize,
)

pytestmark = pytest.mark.unit


def binomial_pass_at_k(n: int, c: int, k: int) -> float:
    """The textbook formula with exact integer binomials."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (4, 0, 4, 0.0),  # c = 0: never
        (4, 1, 4, 1.0),  # n = k: any correct sample is drawn
        (4, 4, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (64, 1, 8, 8 / 64),  # one correct among 64: P(drawn in 8) = 8/64
    ],
)
def test_pass_at_k_table(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_everywhere():
    for n in (1, 2, 5, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(binomial_pass_at_k(n, c, k), abs=1e-10)


def test_pass_at_k_large_n_is_stable():
    # C(2000, 1000) overflows float; the product form does not
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(1 - 0.5**3, abs=2e-3)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_1_mean_and_standard_error():
    correct = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    mean, se = pass_at_1(correct)
    per_problem = np.array([0.5, 1.0, 0.0])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(per_problem.std(ddof=1) / math.sqrt(3))


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_order():
    assert majority_correct(["5", None, None, "5", "7"], [True, False, False, True, False])
    assert not majority_correct(["7", "5"], [False, True])  # tie: the first seen wins
    assert not majority_correct([None, None], [False, False])
    answers = [["1", "2", "2", "2"], ["3", "3", "4", "4"]]
    correct = [[True, False, False, False], [False, False, True, True]]
    assert maj_at_k(answers, correct, 4) == pytest.approx(0.0)  # "2" wins; tie -> "3" wins
    assert maj_at_k(answers, correct, 1) == pytest.approx(0.5)


def test_summarize_reports_truncation_length_and_ks():
    correct = [[True, False], [False, False]]
    out = summarize(correct, [["1", "2"], [None, "3"]], ["stop", "length", "stop", "length"], [10, 20, 30, 40])
    assert out["pass@1"] == pytest.approx(0.25)
    assert out["pass@k"] == {"2": pytest.approx(0.5)}
    assert out["truncation_rate"] == pytest.approx(0.5)
    assert out["mean_tokens"] == pytest.approx(25.0)
    assert default_ks(64) == [2, 4, 8, 16, 32, 64] and default_ks(6) == [2, 4, 6] and default_ks(1) == []


# ---------------------------------------------------------------------------------------
# Extraction


def test_strip_think():
    assert strip_think("<think>2+2=4</think>\\boxed{4}") == "\\boxed{4}"
    assert strip_think("<think>2+2=4 so \\boxed{5}") is None  # never closed: no answer
    assert strip_think("2+2=4</think> \\boxed{4}", think_in_prompt=True) == " \\boxed{4}"
    assert strip_think("still thinking", think_in_prompt=True) is None
    assert strip_think("plain \\boxed{4}") == "plain \\boxed{4}"


def test_last_boxed_handles_nesting_and_takes_the_last():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\fbox{ 7 }") == "7"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no box") is None


def test_final_number_and_choice_letter():
    assert final_number("it costs 1,234.50 dollars, not 3.") == "3"
    assert final_number("total: -1,234.5") == "-1234.5"
    assert final_number("none") is None
    assert choice_letter(r"so \boxed{C}") == "C"
    assert choice_letter(r"\boxed{\text{(b)}}") == "B"
    assert choice_letter("The answer is (D).") == "D"
    assert choice_letter("Answer: A") == "A"
    assert choice_letter(r"\boxed{E}") is None


def test_code_block_prefers_python_and_last():
    text = "```text\nx\n```\n```python\ndef f():\n    return 1\n```\nand\n```py\ndef g(): pass\n```"
    assert code_block(text) == "def g(): pass\n"
    assert code_block("```\nprint(1)\n```") == "print(1)\n"
    assert code_block("```python\nunterminated") is None


def test_paired_difference_against_hand_computed_values():
    a = {"p1": [True, False], "p2": [False, False], "p3": [True, True]}
    b = {"p3": [True, True], "p1": [True, True], "p2": [True, False]}  # order of keys must not matter
    # per-problem differences: p1 1 - 0.5 = 0.5, p2 0.5 - 0 = 0.5, p3 0
    d = np.array([0.5, 0.5, 0.0])
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(1 / 3)
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    # pairing: the shared difficulty spread cancels, so the paired s.e. is below the unpaired one
    per_a = [np.mean(a[k]) for k in sorted(a)]
    per_b = [np.mean(b[k]) for k in sorted(a)]
    unpaired = math.sqrt(np.var(per_a, ddof=1) / 3 + np.var(per_b, ddof=1) / 3)
    assert se < unpaired
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same problems for both models; 1 differ"):
        paired_difference(a, {"p1": [True], "p2": [True]})
