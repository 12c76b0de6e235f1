"""Params: the schema, the typed sections and the checks (no torch imported here)."""

from reprotune.config.check import ParamsError, Problem, check_params, load_params
from reprotune.config.sections import Params
from reprotune.errors import EXIT_BAD_INPUT

__all__ = ["EXIT_BAD_INPUT", "ParamsError", "Params", "Problem", "check_params", "load_params"]
