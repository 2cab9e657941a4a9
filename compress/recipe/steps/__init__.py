"""Recipe step types: the registry (`register_step`, `step_types`) and the built-in steps."""

from .base import Artifact, Step, StepContext, get_step, register_step, step_types

__all__ = ["Artifact", "Step", "StepContext", "get_step", "register_step", "step_types"]
