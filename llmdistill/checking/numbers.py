r"""The ``numeric`` rule: a final answer is a number, compared exactly.

One rule, used by ``build`` and ``eval`` alike: the answer and the reference are read as exact
rationals and must be **equal** -- no tolerance, so ``100000000001 != 100000000000``.
Before that, both are normalised:

* thousands separators (``1,000``, ``1\,000``, ``1{,}000``, ``1 000``) are dropped; a comma that
  is not a thousands separator (``1,5``) makes the text "not a number";
* a sign (``+``, ``-``, ``−``), trailing zeros (``60.0`` = ``60``), a trailing full stop, a leading
  ``x =`` and a currency sign (``$``, ``\$``, ``€``, ``£``) do not matter;
* simple fractions (``3/4``, ``\frac{3}{4}``, ``-\dfrac{3}{4}``) and scientific notation
  (``1.5e3``, ``1.5 \times 10^{3}``) are their values;
* a magnitude word scales the number: ``3 thousand`` is 3000, ``1.5 million`` 1500000, ``2 dozen``
  24, ``3 hundredths`` 0.03 (hundred, thousand, million, billion, trillion, dozen; tenth, hundredth,
  thousandth, millionth; plurals too);
* a trailing unit word (``60 coins``, ``60\text{ cm}``, ``45^\circ``) is a label and is dropped;
  so is ``%``: ``60\%`` reads as 60, not 0.6;
* LaTeX wrappers (``$``, ``\text{}``, ``\mathrm{}``, ``\left``/``\right``) are removed.

:func:`canonical_number` writes a value back in one canonical form (``60``, ``0.5``, ``1/3``),
which is what maj@k votes on: ``60``, ``60.0`` and ``120/2`` are one vote.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

MAX_EXPONENT = 400  # 10^400 is far beyond any answer; larger exponents are not numbers here

_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,!;:> ]|~")
_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_EXP = r"(?:[eE](?P<e1>[+-]?\d+)|\s*(?:\\times|\\cdot|\*|×)\s*10\s*\^\s*(?:\{\s*(?P<e2>[+-]?\d+)\s*\}|(?P<e3>\d)))"
_NUMBER = re.compile(
    rf"(?P<sign>[+-]?)\s*(?:"
    rf"\\frac\s*\{{\s*(?P<fn>[+-]?(?:{_DEC}))\s*\}}\s*\{{\s*(?P<fd>[+-]?(?:{_DEC}))\s*\}}"
    rf"|(?P<num>{_DEC})(?:{_EXP})?(?:\s*/\s*(?P<den>{_DEC}))?"
    rf")"
)
# a magnitude word after the number multiplies it (a unit may follow: "5 million dollars")
_SCALES = {"dozen": Fraction(12), "hundred": Fraction(10**2), "thousand": Fraction(10**3), "million": Fraction(10**6),
           "billion": Fraction(10**9), "trillion": Fraction(10**12), "tenth": Fraction(1, 10),
           "hundredth": Fraction(1, 10**2), "thousandth": Fraction(1, 10**3), "millionth": Fraction(1, 10**6)}
_SCALE = re.compile(rf"\s*({'|'.join(sorted(_SCALES, key=len, reverse=True))})s?\b", re.IGNORECASE)
# a unit: % or °, or a word that is separated by a space or has two letters or more ("5 m", "60cm"; not "5i")
_UNIT = re.compile(r"\s*(?:[%°]|(?:(?<=\s)|(?=[A-Za-z]{2}))[A-Za-z][A-Za-z°%.\s/]*(?:\^\s*\{?[23]\}?)?)?\s*\.?\s*")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_GROUPED_SPACES = re.compile(r"(?<=\d) (?=\d{3}(?!\d))")


def _clean(text: str) -> str:
    s = text.strip().strip("$").strip()
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        s = _WRAPPERS.sub(r"\1", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("{,}", ",").replace("−", "-").replace("\\%", "%").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "°", s)
    s = re.sub(r"^(?:\\\$|\$|€|£)\s*", "", s)
    s = re.sub(r"^([+-])\s*(?:\\\$|\$|€|£)\s*", r"\1", s)
    s = _ASSIGNMENT.sub("", s)
    return _GROUPED_SPACES.sub("", s.strip())


def _decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of a numeric answer, or ``None`` when it is not one number (see the module docs).

    Examples: ``"1,234.50"`` -> 2469/2; ``"\\frac{3}{4}"`` -> 3/4; ``"1.5e3 m"`` -> 1500; ``"3 thousand"`` -> 3000;
    ``"1,5"`` -> None; ``"2\\sqrt{3}"`` -> None.
    """
    if text is None:
        return None
    s = _clean(text)
    match = _NUMBER.match(s)
    if match is None:
        return None
    end, scale = match.end(), Fraction(1)
    while (word := _SCALE.match(s, end)) is not None:
        end, scale = word.end(), scale * _SCALES[word[1].lower()]
    if not _UNIT.fullmatch(s, end):
        return None
    try:
        if match["fn"] is not None:
            num, den = _decimal(match["fn"]), _decimal(match["fd"])
            exponent = 0
        else:
            num = _decimal(match["num"])
            den = _decimal(match["den"]) if match["den"] is not None else Decimal(1)
            exponent = int(match["e1"] or match["e2"] or match["e3"] or 0)
    except InvalidOperation:
        return None
    if den == 0 or abs(exponent) > MAX_EXPONENT:
        return None
    value = Fraction(num) / Fraction(den) * Fraction(10) ** exponent * scale
    return -value if match["sign"] == "-" else value


def canonical_number(value: Fraction) -> str:
    """One spelling per value: ``60``, ``-0.125``, ``1/3`` (a decimal when it terminates, else p/q)."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")


def same_number(answer: str | None, reference: str) -> bool:
    """The numeric rule: both parse as numbers and are exactly equal."""
    a, b = parse_number(answer), parse_number(reference)
    return a is not None and b is not None and a == b
