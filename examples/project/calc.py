"""A tiny project with a bug, frozen into a snapshot by the examples."""


def add(a: int, b: int) -> int:
    return a - b  # the bug the candidate patches try to fix


def sub(a: int, b: int) -> int:
    return a - b
