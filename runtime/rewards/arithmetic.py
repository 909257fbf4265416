r"""Verifier of the embedded arithmetic task.

Prompts look like ``"Compute 37+58="`` (operators ``+ - *``, integer operands, possibly
negative); the answer is an integer. The response's *final integer* is compared with the
reference::

    score = 1  if last_number(response) is an integer equal to int(reference)
            0  otherwise (no number, a non-integer last number, or a different value)

Parsing of the final number: the last match of ``-?\d{1,3}(,\d{3})+ | -?\d+(\.\d+)?`` in
the response; thousands separators are removed, ``"95.0"`` counts as 95, ``"95.5"`` is not
an integer (score 0). A minus sign directly before the digits is the number's sign
(``"37-58=-21"`` → −21). An empty ``reference`` is computed from the prompt (the last
``a op b`` in it), so the verifier also works on bare prompts.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["ArithmeticVerifier", "final_number", "solve_prompt"]

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d.])|-?\d+(?:\.\d+)?")
_EXPR = re.compile(r"(-?\d+)\s*([+\-*×x])\s*(-?\d+)")


def final_number(text: str) -> Fraction | None:
    """The last number written in ``text`` (exact), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return Fraction(matches[-1].replace(",", ""))


def solve_prompt(prompt: str) -> int | None:
    """The value of the last ``a op b`` in an arithmetic prompt, or None."""
    found = _EXPR.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    x, y = int(a), int(b)
    return x + y if op == "+" else x - y if op == "-" else x * y


class ArithmeticVerifier:
    """1.0 if the response's final integer equals the reference answer, else 0.0."""

    name = "arithmetic"

    def score(self, prompt: str, response: str, reference: str) -> float:
        ref = reference.strip() if reference else ""
        if ref:
            want = final_number(ref)
        else:
            solved = solve_prompt(prompt)
            want = None if solved is None else Fraction(solved)
        if want is None or want.denominator != 1:
            raise ValueError(f"arithmetic reference is not an integer: {reference!r}")
        got = final_number(response)
        return 1.0 if got is not None and got.denominator == 1 and got == want else 0.0
