"""Strict JSON for what clients send: bodies and the originating identity.

`json.loads` accepts more than the broker can store or log: NaN and Infinity,
numbers that overflow to inf, lone surrogates (a `"\\ud800"` escape: no UTF-8 for
it), and nesting deep enough to raise RecursionError (not a ValueError, so it
escaped as a 500). Everything refused here raises `UnparsableJson` (a ValueError)
whose message says why, in words fit for a 400.
"""

from __future__ import annotations

import json
from typing import Any

# Far deeper than any OSB body or parameters need, far below the recursion limit
# that json.dumps, the state store's serialiser and jsonify run into.
MAX_DEPTH = 32


class UnparsableJson(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise UnparsableJson(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise UnparsableJson(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """Parse `data` (UTF-8 when bytes) or raise `UnparsableJson`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise UnparsableJson("it is not UTF-8") from None
    except RecursionError:
        raise UnparsableJson(f"it is nested more than {MAX_DEPTH} levels deep") from None
    except UnparsableJson:
        raise
    except json.JSONDecodeError as exc:
        raise UnparsableJson(f"{exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # an integer beyond Python's 4300-digit limit
        raise UnparsableJson(str(exc).split(":")[0]) from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Depth and strings, iteratively (what parsed may be ~1000 levels deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise UnparsableJson(f"it is nested more than {MAX_DEPTH} levels deep")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnparsableJson("a string holds a lone surrogate (\\ud800-\\udfff)") from None
