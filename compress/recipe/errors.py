"""The one error a recipe raises: the file, the field path and what is wrong with it."""

from __future__ import annotations

from pathlib import Path

from pocketfleet import PocketfleetError


class RecipeError(PocketfleetError):
    """A recipe that cannot run: `{file}: {path}: {problem}` (e.g. `r.toml: steps[1].ratio: ...`)."""

    def __init__(self, problem: str, path: str = "", file: str | Path | None = None) -> None:
        self.problem, self.path, self.file = problem, path, str(file) if file is not None else None
        where = ": ".join(p for p in (self.file, path) if p)
        super().__init__(f"{where}: {problem}" if where else problem)
