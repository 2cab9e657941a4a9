"""The one error a recipe raises: the file, the field path and what is wrong with it."""

from __future__ import annotations

from pocketfleet.config import ConfigError


class RecipeError(ConfigError):
    """A recipe that cannot run: `{file}: {path}: {problem}` (e.g. `r.toml: steps[1].ratio: ...`)."""
