"""How deep a JSON document nests, found without parsing it.

Python's JSON parser recurses once per level: past the interpreter's recursion limit it raises
RecursionError, and where some library has raised that limit (test tools and ML stacks do), a
deep enough document overflows the C stack and kills the process. So nesting is bounded before
any parser (ours or the engine's) sees the body, at C speed: escapes and strings are removed
with two regular expressions (a bracket inside a string does not nest), and only the brackets
left are counted.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Final

MAX_JSON_DEPTH: Final = 256  # tool schemas nest a dozen levels; vLLM's own parsers stop far deeper

_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
# Opening brackets become 1 and closing ones -1 (as signed bytes); everything else is deleted.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def nesting_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when brackets outside strings nest deeper than `limit` anywhere in `body`."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case: two C-level counts
    bare = _STRING.sub(b"", _ESCAPE.sub(b"", body))
    steps = array("b", bare.translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit
