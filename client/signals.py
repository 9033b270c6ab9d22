"""Signal names and numbers as people write them: TERM, SIGTERM, term, 15, RTMIN+2."""

from __future__ import annotations

import signal


def parse_signal(text: str) -> int:
    """The signal number for ``text``; raises ValueError with a readable message."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        if not 0 < number <= signal.SIGRTMAX:
            raise ValueError(f"signal number {number} out of range 1..{int(signal.SIGRTMAX)}")
        return number
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    for base in ("SIGRTMIN", "SIGRTMAX"):
        if name.startswith(base) and name != base:
            return _realtime(base, name[len(base):], text)
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text!r} (try TERM, KILL, HUP, INT, USR1 or a number)") from None


def _realtime(base: str, offset_text: str, original: str) -> int:
    try:
        offset = int(offset_text)
    except ValueError:
        raise ValueError(f"unknown signal {original!r}") from None
    number = int(getattr(signal, base)) + offset
    if not signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        raise ValueError(f"signal {original!r} is outside SIGRTMIN..SIGRTMAX")
    return number


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15; real-time signals as ``SIGRTMIN+n``; unknown as the number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return str(number)
