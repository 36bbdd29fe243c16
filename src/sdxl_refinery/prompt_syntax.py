"""A1111's prompt attention syntax, parsed without any model: `(words)`, `[words]`, `(words:1.3)`.

The engine weights token embeddings by it (engine/prompts.py); validation uses it to refuse weights no
model can use, before any work.
"""

from __future__ import annotations

import math

UP, DOWN = 1.1, 1 / 1.1


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pieces by A1111's attention syntax.

    Unbalanced brackets are closed at the end of the text, as A1111 does.
    """
    pieces: list[tuple[str, float]] = []
    stack: list[tuple[str, int]] = []  # bracket kind and index of the first piece it covers
    buffer: list[str] = []

    def flush() -> None:
        if buffer:
            pieces.append(("".join(buffer), 1.0))
            buffer.clear()

    def close(kind: str, weight: float) -> None:
        flush()
        _, start = stack.pop()
        for i in range(start, len(pieces)):
            pieces[i] = (pieces[i][0], pieces[i][1] * weight)

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            buffer.append(text[i + 1])
            i += 2
            continue
        if char in "([":
            flush()
            stack.append((char, len(pieces)))
        elif char == ")" and stack and stack[-1][0] == "(":
            fragment = "".join(buffer)
            head, sep, tail = fragment.rpartition(":")
            weight = UP
            if sep:
                try:
                    weight = float(tail)
                    buffer[:] = list(head)
                except ValueError:
                    pass
            close("(", weight)
        elif char == "]" and stack and stack[-1][0] == "[":
            close("[", DOWN)
        else:
            buffer.append(char)
        i += 1
    flush()
    while stack:
        close(stack[-1][0], UP if stack[-1][0] == "(" else DOWN)
    merged: list[tuple[str, float]] = []
    for fragment, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        elif fragment:
            merged.append((fragment, weight))
    return merged or [("", 1.0)]


MAX_ATTENTION = 100.0  # |weight| beyond this only overflows: 1,000 "(" would be 1.1^1000


def check_attention(text: str) -> str | None:
    """Why the weights of `text` cannot be used, or None."""
    for fragment, weight in parse_weighted(text):
        if not math.isfinite(weight) or abs(weight) > MAX_ATTENTION:
            shown = fragment.strip()[:40] or "(empty)"
            return (
                f"the attention weight of {shown!r} comes to {weight:.3g}; weights must be within "
                f"±{MAX_ATTENTION:g} (each ( multiplies by 1.1, (word:1.5) sets 1.5)"
            )
    return None
