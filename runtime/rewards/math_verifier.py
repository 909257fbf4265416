r"""Verifier of math answers: exact match after normalisation, or numeric equivalence.

Answer extraction from the response (first rule that applies):

1. the content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced;
2. the text after the last "answer is" / "answer:" (case-insensitive), up to the end of
   that line;
3. the whole response.

Normalisation ``norm(s)`` (applied to the extracted answer and to the reference):
drop ``$``, ``\left``/``\right``, ``\!``/``\,``/``\;``/``\ ``, ``^\circ``/``^{\circ}``,
``\%``/``%``; ``\text{x}``/``\mathrm{x}``/``\textbf{x}`` → ``x``; ``\dfrac``/``\tfrac`` →
``\frac``; ``\frac{a}{b}`` and ``\frac ab`` → ``(a)/(b)``; strip every whitespace; drop
trailing periods; drop a leading ``x=`` style variable assignment; remove thousands
commas inside numbers (``1,234`` → ``1234``) unless the answer has brackets (``(1,234)``
may be a pair); ``\sqrt3`` → ``\sqrt{3}``; lower-case.

Score::

    1  if norm(answer) == norm(reference)
    1  if both parse as numbers a, r (integers, decimals, scientific notation, a/b,
       (a)/(b), mixed signs) and |a − r| ≤ rel_tol · max(1, |r|)
    1  if rule 3 applied (no box, no "answer is"), the reference is a number and the
       response's last number matches it as above
    0  otherwise

Numbers are parsed exactly with ``fractions.Fraction``, so ``0.5``, ``1/2`` and
``\frac{1}{2}`` are equal; ``rel_tol`` (default 1e-6) covers rounded decimals such as
``0.333333`` for ``1/3`` only when the response gives at least 6 significant digits.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MathVerifier", "extract_answer", "normalize_answer", "parse_number"]

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"
_FRACTION = re.compile(rf"^\(?({_NUM})\)?/\(?({_NUM})\)?$")
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _braced(s: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``s[start] == '{'`` and the index after it."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1 : i], i + 1
    return None


def extract_answer(response: str) -> tuple[str, bool]:
    """The answer part of a response and whether it was explicit (boxed / "answer is")."""
    boxes = list(_BOX.finditer(response))
    for m in reversed(boxes):
        got = _braced(response, m.end() - 1)
        if got is not None:
            return got[0], True
    marks = list(_ANSWER_IS.finditer(response))
    if marks:
        tail = response[marks[-1].end() :].strip()
        return (tail.splitlines()[0] if tail else ""), True
    return response, False


def _replace_frac(s: str) -> str:
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        k = j + len("\\frac")
        args = []
        for _ in range(2):
            while k < len(s) and s[k] == " ":
                k += 1
            if k < len(s) and s[k] == "{":
                got = _braced(s, k)
                if got is None:
                    break
                args.append(_replace_frac(got[0]))
                k = got[1]
            elif k < len(s):
                args.append(s[k])
                k += 1
        if len(args) != 2:
            out.append(s[j:])
            return "".join(out)
        out.append(f"({args[0]})/({args[1]})")
        i = k


def normalize_answer(s: str) -> str:
    """Canonical text form of an answer (see module doc)."""
    s = s.replace("$", "")
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "^{\\circ}", "^\\circ",
                "\\%", "%", "\\displaystyle"):
        s = s.replace(tok, "")
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _replace_frac(s)
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^[a-zA-Z]\w*=(?!=)", "", s)
    if not re.search(r"[()\[\]{}]", s):  # "(1,234)" may be a pair: leave it alone
        s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    if re.fullmatch(r"\(([^()]*)\)", s):  # one pair of redundant outer parentheses
        s = s[1:-1]
    return s.lower()


def parse_number(s: str) -> Fraction | None:
    """Exact value of a normalised numeric answer (int, decimal, 1e-3, a/b, (a)/(b))."""
    s = s.strip()
    if not s:
        return None
    m = _FRACTION.match(s)
    try:
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else Fraction(m.group(1)) / den
        if re.fullmatch(_NUM, s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


class MathVerifier:
    """1.0 if the response's answer matches the reference (see module doc), else 0.0."""

    name = "math"

    def __init__(self, rel_tol: float = 1e-6) -> None:
        self.rel_tol = rel_tol

    def _num_equal(self, a: Fraction | None, r: Fraction | None) -> bool:
        if a is None or r is None:
            return False
        return abs(float(a - r)) <= self.rel_tol * max(1.0, abs(float(r)))

    def score(self, prompt: str, response: str, reference: str) -> float:
        ref_raw, _ = extract_answer(reference)
        ref = normalize_answer(ref_raw)
        answer, explicit = extract_answer(response)
        got = normalize_answer(answer)
        if got == ref and got:
            return 1.0
        r = parse_number(ref)
        if self._num_equal(parse_number(got), r):
            return 1.0
        if not explicit and r is not None:
            numbers = _LAST_NUMBER.findall(response)
            if numbers and self._num_equal(parse_number(normalize_answer(numbers[-1])), r):
                return 1.0
        return 0.0
