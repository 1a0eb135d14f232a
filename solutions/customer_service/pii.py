"""Masking of personal data in text before it is stored (turns, suggestions, feedback, KB entries).

What is masked (replaced by a typed placeholder so the text stays readable for agents and models):
  - payment card numbers: 13-19 digits, optionally grouped by spaces/dashes, *Luhn-valid* only
    (so order numbers and phone numbers are not taken for cards) -> ``[CARD]``
  - e-mail addresses -> ``[EMAIL]``
  - phone numbers: international (+CC ...) or 10+ digit groups with separators -> ``[PHONE]``
  - IBAN-like account numbers (2 letters, 2 digits, 11-30 alphanumerics) -> ``[IBAN]``
"""

from __future__ import annotations

import re

CARD_RE = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE_RE = re.compile(r"(?<!\w)(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?!\w)"
                      r"|(?<!\w)\+\d{8,14}(?!\w)")
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]){11,30}\b")


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


def _phone(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[PHONE]" if len(digits) >= 9 else m.group(0)


def mask_pii(text: str) -> str:
    """Text with card numbers, e-mails, IBANs and phone numbers replaced by placeholders."""
    text = EMAIL_RE.sub("[EMAIL]", text)
    text = CARD_RE.sub(_card, text)
    text = IBAN_RE.sub("[IBAN]", text)
    return PHONE_RE.sub(_phone, text)


def has_pii(text: str) -> bool:
    return mask_pii(text) != text
