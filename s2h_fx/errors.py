"""The errors s2h-fx raises. Every one names the problem and, where known, the node."""

from __future__ import annotations


class S2HError(Exception):
    """Base class of every error raised by s2h-fx."""


class TraceError(S2HError):
    """The model could not be traced or shape-propagated with torch.fx."""


class BudgetError(S2HError, ValueError):
    """The budget is malformed or cannot be met."""


class InputError(S2HError, ValueError):
    """Example inputs are missing or do not fit the model."""


class DataError(InputError):
    """A dataset is missing, incomplete, unreadable or not in the expected layout
    (the message names the path and, where there is one, what to install)."""


class DeployError(S2HError):
    """A runtime is unknown, not installed, or cannot run here; or a deployed network
    disagrees with the module it was built from."""


class NoPrunableChannelsError(S2HError):
    """Every channel group of the model is frozen."""


class UnsupportedOpError(S2HError):
    """``strict=True`` and the graph holds ops without a coupling rule."""


class InvariantError(S2HError):
    """An internal invariant between passes was violated (a bug: please report it)."""


class NonFiniteError(S2HError, FloatingPointError):
    """Training met non-finite losses or gradients too many steps in a row, or a
    network to export holds non-finite values."""


class CheckpointError(S2HError):
    """A training checkpoint is missing, unreadable, or from another run."""
