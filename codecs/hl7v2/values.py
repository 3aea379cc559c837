"""HL7 v2 values: escape sequences, timestamps (TS/DTM) and numbers (NM, MO amounts).

Each parser takes the field's location (``SCH-11.4``) so that a refusal names it.  Parsing
libraries accept ``20261399`` as a date and ``NaN`` as a number; these do not.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal

from caresync.codecs.hl7v2.charset import Delimiters
from caresync.codecs.hl7v2.errors import BAD_VALUE, Hl7Error

_TS = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,9}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)
_DECIMAL = re.compile(r"[+-]?(?:\d{1,15}(?:\.\d{0,6})?|\.\d{1,6})")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_FORMATTING = (".in", ".ti", ".sk", ".ce", ".fi", ".nf")
MAX_OFFSET_MIN = 14 * 60


def unescape(value: str, delims: Delimiters, codec: str, where: str) -> str:
    """Replace escape sequences (``\\F\\``, ``\\Xhh\\``, ``\\.br\\``...) by what they stand for.

    Unknown sequences and a lone escape character are kept verbatim (senders that never
    escape a backslash are common); a malformed ``\\X..\\`` is refused.
    """
    esc = delims.escape
    if esc not in value:
        return value
    out: list[str] = []
    pos, size = 0, len(value)
    while pos < size:
        start = value.find(esc, pos)
        if start < 0:
            out.append(value[pos:])
            break
        out.append(value[pos:start])
        end = value.find(esc, start + 1)
        if end < 0:
            out.append(value[start:])
            break
        seq = value[start + 1 : end]
        replacement = _sequence(seq, delims, codec, where)
        out.append(value[start : end + 1] if replacement is None else replacement)
        pos = end + 1
    return "".join(out)


def _sequence(seq: str, d: Delimiters, codec: str, where: str) -> str | None:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition}
    simple["E"] = d.escape
    if d.truncation:
        simple["P"] = d.truncation
    if seq in simple:
        return simple[seq]
    if seq in ("H", "N"):
        return ""
    if seq == ".br" or seq.startswith(".sp"):
        return "\n"
    if seq.startswith(_FORMATTING):
        return ""
    if seq.startswith("X") and len(seq) > 1:
        digits = seq[1:]
        if not _HEX.fullmatch(digits):
            raise Hl7Error(
                f"{where} holds the escape sequence \\X{digits[:20]}\\ whose digits are not "
                "pairs of hexadecimal digits: fix the value",
                code=BAD_VALUE,
                location=where,
            )
        try:
            return bytes.fromhex(digits).decode(codec)
        except UnicodeDecodeError:
            raise Hl7Error(
                f"{where} holds the escape sequence \\X{digits[:20]}\\ whose bytes are not "
                f"valid {codec}, the message's character set: fix the value",
                code=BAD_VALUE,
                location=where,
            ) from None
    return None


def escape(text: str, delims: Delimiters) -> str:
    """Escape delimiters and line breaks so ``text`` is one safe HL7 value."""
    esc = delims.escape
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in (
        (delims.field, "F"),
        (delims.component, "S"),
        (delims.subcomponent, "T"),
        (delims.repetition, "R"),
    ):
        out = out.replace(char, f"{esc}{code}{esc}")
    if delims.truncation:
        out = out.replace(delims.truncation, f"{esc}P{esc}")
    out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{esc}.br{esc}")
    return "".join(ch if ch >= " " or ch == "\t" else " " for ch in out)


def parse_ts(value: str, where: str, default_tz: tzinfo, at: str = "") -> datetime:
    """A TS/DTM value ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` as an aware datetime.

    Without an offset the time is in ``default_tz``.  Raises Hl7Error naming ``where`` (and
    ``at``, such as `` (line 9)``, for a repeated segment).
    """
    text = value.strip()
    match = _TS.fullmatch(text)
    if match is None:
        raise _bad_ts(where, at, text, "expected YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]")
    year, month, day, hour, minute, second, frac, sign, off_h, off_m = match.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        when = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
        )
    except ValueError as exc:
        raise _bad_ts(where, at, text, str(exc)) from None
    if sign is None:
        return when.replace(tzinfo=default_tz)
    minutes = int(off_h) * 60 + int(off_m)
    if int(off_m) >= 60 or minutes > MAX_OFFSET_MIN:
        raise _bad_ts(where, at, text, "the UTC offset must be between -1400 and +1400")
    offset = timedelta(minutes=-minutes if sign == "-" else minutes)
    return when.replace(tzinfo=timezone(offset))


def _bad_ts(where: str, at: str, text: str, why: str) -> Hl7Error:
    return Hl7Error(
        f"{where}{at} {text[:40]!r} is not a valid date/time ({why}): fix the value",
        code=BAD_VALUE,
        location=where,
    )


def parse_decimal(value: str, where: str, what: str, at: str = "") -> Decimal:
    """An NM value (plain decimal: no exponent, NaN or infinity) as a Decimal."""
    text = value.strip()
    if not _DECIMAL.fullmatch(text) or text in ("+", "-"):
        raise Hl7Error(
            f"{where}{at} ({what}) {text[:40]!r} is not a decimal number such as 12 or 12.50: "
            "fix the value",
            code=BAD_VALUE,
            location=where,
        )
    return Decimal(text)


def parse_count(value: str, where: str, what: str, at: str = "", *, limit: int = 1_000_000) -> int:
    """A positive whole number (an NM without a fraction), at most ``limit``."""
    number = parse_decimal(value, where, what, at)
    if number != number.to_integral_value() or not 0 < number <= limit:
        raise Hl7Error(
            f"{where}{at} ({what}) {value.strip()[:40]!r} must be a whole number from 1 to "
            f"{limit:,}: fix the value",
            code=BAD_VALUE,
            location=where,
        )
    return int(number)


def decimal_text(number: Decimal) -> str:
    """A Decimal as plain text, exact, without exponent or sign for zero (``100.50``)."""
    if number == 0:
        number = abs(number)
    return f"{number:f}"
