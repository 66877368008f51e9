"""Exit names and numbers, one home for all: the training log's ``exit1`` (shallowest) ... ``deepest``.

Internally (``MultiExitModel.exit_points[k]``, ``forward_exit(k, ...)``) exits are 0-based; users see
``exit = k + 1`` and the deepest classifier as ``num_exits + 1`` or ``'deepest'``.
"""

from __future__ import annotations

from typing import List, Union

__all__ = ["ExitRef", "exit_name", "exit_names", "resolve_exit"]

#: An exit as users name it: 1-based int (``num_exits + 1`` is the deepest), ``'exitN'`` or ``'deepest'``.
ExitRef = Union[int, str]


def exit_name(k: int, num_exits: int) -> str:
    """The log's name of the 0-based exit ``k``: ``'exit{k+1}'``, or ``'deepest'`` for ``k == num_exits``."""
    return "deepest" if k == num_exits else f"exit{k + 1}"


def exit_names(num_exits: int) -> List[str]:
    """``['exit1', ..., 'exitE', 'deepest']``."""
    return [exit_name(k, num_exits) for k in range(num_exits + 1)]


def resolve_exit(exit: ExitRef, num_exits: int, what: str = "exit") -> int:
    """The 0-based index of a user-facing exit (1-based int, ``'exitN'`` or ``'deepest'``)."""
    if isinstance(exit, str):
        if exit == "deepest":
            return num_exits
        if exit.startswith("exit") and exit[4:].isdigit():
            exit = int(exit[4:])
        else:
            raise ValueError(f"{what} {exit!r} is not an exit name: use 'exit1' ... 'exit{num_exits}' or 'deepest'.")
    if isinstance(exit, bool) or not isinstance(exit, int):
        raise TypeError(f"{what} must be an int (1-based) or a name like 'exit1' / 'deepest', got {exit!r}.")
    if not 1 <= exit <= num_exits + 1:
        raise ValueError(
            f"{what} {exit} is out of range: this model has exits 1..{num_exits} and {num_exits + 1} "
            "(or 'deepest') for the deepest classifier."
        )
    return exit - 1
