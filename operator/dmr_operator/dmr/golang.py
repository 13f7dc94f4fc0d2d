"""Go standard-library behaviour that model-runner's rules and messages depend on.

model-runner is written in Go, so its error texts quote values with ``strconv.Quote`` (``%q``),
its keep_alive values go through ``time.ParseDuration`` and come back as ``Duration.String()``,
and raw runtime flags are split by ``github.com/mattn/go-shellwords`` (v1.0.13, defaults). The
pure rule modules beside this one (``validation``, ``wire``) and the emulator use these so the
same inputs produce the same results and the same text as the real runner. No I/O here.
"""

from __future__ import annotations

from typing import Final

NANOSECOND: Final = 1
MICROSECOND: Final = 1000 * NANOSECOND
MILLISECOND: Final = 1000 * MICROSECOND
SECOND: Final = 1000 * MILLISECOND
MINUTE: Final = 60 * SECOND
HOUR: Final = 60 * MINUTE

# time.ParseDuration's unit table; both micro signs are accepted (U+00B5 and U+03BC).
DURATION_UNITS: Final[dict[str, int]] = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,
    "\u03bcs": MICROSECOND,
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}

_INT64_OVERFLOW: Final = 1 << 63
_SIMPLE_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


class DurationError(ValueError):
    """A string ``time.ParseDuration`` refuses; str() is Go's message."""


class ShellwordsError(ValueError):
    """A line go-shellwords refuses; str() is its message."""


def quote(text: str) -> str:
    """``strconv.Quote``: what Go's ``%q`` prints for a string."""
    out = ['"']
    for char in text:
        if char in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif 0xD800 <= ord(char) <= 0xDFFF:  # a lone surrogate is invalid UTF-8 in Go
            out.append("\\ufffd")
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)


def _time_quote(text: str) -> str:
    """The time package's own quoting: bytes of non-ASCII or control characters as ``\\xNN``."""
    out = ['"']
    for char in text:
        if ord(char) >= 0x80 or char < " ":
            encoded = char.encode("utf-8", errors="replace")
            out.extend(f"\\x{byte:02x}" for byte in encoded)
        else:
            if char in '"\\':
                out.append("\\")
            out.append(char)
    out.append('"')
    return "".join(out)


def _leading_int(text: str) -> tuple[int, str]:
    value = 0
    index = 0
    while index < len(text) and "0" <= text[index] <= "9":
        if value > _INT64_OVERFLOW // 10:
            raise OverflowError
        value = value * 10 + int(text[index])
        if value > _INT64_OVERFLOW:
            raise OverflowError
        index += 1
    return value, text[index:]


def _leading_fraction(text: str) -> tuple[int, float, str]:
    value = 0
    scale = 1.0
    overflow = False
    index = 0
    while index < len(text) and "0" <= text[index] <= "9":
        if not overflow:
            if value > (_INT64_OVERFLOW - 1) // 10:
                overflow = True
            else:
                candidate = value * 10 + int(text[index])
                if candidate > _INT64_OVERFLOW:
                    overflow = True
                else:
                    value = candidate
                    scale *= 10
        index += 1
    return value, scale, text[index:]


def parse_duration(text: str) -> int:
    """``time.ParseDuration``: nanoseconds, or DurationError with Go's message."""
    original = text
    invalid = DurationError(f"time: invalid duration {_time_quote(original)}")
    negative = False
    if text and text[0] in "+-":
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise invalid
    total = 0
    while text:
        if not (text[0] == "." or "0" <= text[0] <= "9"):
            raise invalid
        before = len(text)
        try:
            whole, text = _leading_int(text)
        except OverflowError:
            raise invalid from None
        has_whole = before != len(text)
        fraction, scale, has_fraction = 0, 1.0, False
        if text.startswith("."):
            text = text[1:]
            before = len(text)
            fraction, scale, text = _leading_fraction(text)
            has_fraction = before != len(text)
        if not has_whole and not has_fraction:
            raise invalid
        unit_end = 0
        while unit_end < len(text) and not (text[unit_end] == "." or "0" <= text[unit_end] <= "9"):
            unit_end += 1
        if unit_end == 0:
            raise DurationError(f"time: missing unit in duration {_time_quote(original)}")
        unit_name, text = text[:unit_end], text[unit_end:]
        unit = DURATION_UNITS.get(unit_name)
        if unit is None:
            raise DurationError(
                f"time: unknown unit {_time_quote(unit_name)} in duration {_time_quote(original)}"
            )
        if whole > _INT64_OVERFLOW // unit:
            raise invalid
        whole *= unit
        if fraction > 0:
            whole += int(float(fraction) * (float(unit) / scale))
            if whole > _INT64_OVERFLOW:
                raise invalid
        total += whole
        if total > _INT64_OVERFLOW:
            raise invalid
    if negative:
        return -total
    if total > _INT64_OVERFLOW - 1:
        raise invalid
    return total


def _format_fraction(value: int, precision: int) -> tuple[str, int]:
    """Go's fmtFrac: the fractional digits (trailing zeros dropped) and the integer part."""
    digits: list[str] = []
    printed = False
    for _ in range(precision):
        digit = value % 10
        printed = printed or digit != 0
        if printed:
            digits.append(str(digit))
        value //= 10
    text = ("." + "".join(reversed(digits))) if printed else ""
    return text, value


def format_duration(nanoseconds: int) -> str:
    """``time.Duration.String()``: ``"5m0s"``, ``"1h0m0s"``, ``"1.5s"``, ``"300ms"``, ``"0s"``."""
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    magnitude = abs(nanoseconds)
    if magnitude < SECOND:
        if magnitude < MICROSECOND:
            return f"{sign}{magnitude}ns"
        if magnitude < MILLISECOND:
            fraction, whole = _format_fraction(magnitude, 3)
            return f"{sign}{whole}{fraction}\u00b5s"
        fraction, whole = _format_fraction(magnitude, 6)
        return f"{sign}{whole}{fraction}ms"
    fraction, whole_seconds = _format_fraction(magnitude, 9)
    text = f"{whole_seconds % 60}{fraction}s"
    whole_minutes = whole_seconds // 60
    if whole_minutes > 0:
        text = f"{whole_minutes % 60}m{text}"
        hours = whole_minutes // 60
        if hours > 0:
            text = f"{hours}h{text}"
    return sign + text


_SHELL_SPACES: Final = " \t\r\n"
_SHELL_OPERATORS: Final = ";&|<>"
_SHELL_ERROR: Final = "invalid command line string"


def shell_split(line: str) -> list[str]:
    """go-shellwords ``Parse`` with its defaults (no env expansion, no backticks).

    Quirks kept on purpose: parsing stops silently at an unquoted ``; & | < >`` (the rest of the
    line is dropped), ``\\t``/``\\n`` escapes become tab/newline, ``(`` outside quotes is an error
    unless it follows ``$``, and unbalanced quotes are an error.
    """
    args: list[str] = []
    buffer = ""
    escaped = double_quoted = single_quoted = back_quoted = dollar_quoted = False
    has_arg = False
    for char in line:
        if escaped:
            buffer += {"t": "\t", "n": "\n"}.get(char, char)
            escaped = False
            has_arg = True
            continue
        if char == "\\":
            if single_quoted:
                buffer += char
            else:
                escaped = True
            continue
        if char in _SHELL_SPACES:
            if single_quoted or double_quoted or back_quoted or dollar_quoted:
                buffer += char
            elif has_arg:
                args.append(buffer)
                buffer = ""
                has_arg = False
            continue
        quoted = single_quoted or double_quoted
        if char == "`" and not quoted and not dollar_quoted:
            back_quoted = not back_quoted
        elif char == ")" and not quoted and not back_quoted:
            if not dollar_quoted:
                raise ShellwordsError(_SHELL_ERROR)
            buffer += char
            dollar_quoted = False
            has_arg = True
            continue
        elif char == "(" and not quoted and not back_quoted:
            if not dollar_quoted and buffer.endswith("$"):
                dollar_quoted = True
                buffer += char
                continue
            raise ShellwordsError(_SHELL_ERROR)
        elif char == '"' and not single_quoted and not dollar_quoted:
            if double_quoted:
                has_arg = True
            double_quoted = not double_quoted
            continue
        elif char == "'" and not double_quoted and not dollar_quoted:
            if single_quoted:
                has_arg = True
            single_quoted = not single_quoted
            continue
        elif char in _SHELL_OPERATORS and not (quoted or back_quoted or dollar_quoted):
            if char == ">" and buffer and "0" <= buffer[0] <= "9":
                has_arg = False  # "2>file": the descriptor number is not an argument
            break
        has_arg = True
        buffer += char
    if has_arg:
        args.append(buffer)
    if escaped or single_quoted or double_quoted or back_quoted or dollar_quoted:
        raise ShellwordsError(_SHELL_ERROR)
    return args
