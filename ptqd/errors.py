"""One error hierarchy for ptqd.

``UserError`` (and subclasses) mean the input was wrong: the CLI prints the message on
one line and exits 1, with no traceback (``--debug`` shows it). Anything else escaping
the CLI is a bug in ptqd: it is shown with its traceback, a line asking for a report,
and exit code 2.

Messages say what was expected, what came, and how to fix it.
"""

from __future__ import annotations


class PtqdError(Exception):
    """Base class of every error ptqd raises on purpose."""


class UserError(PtqdError):
    """Bad input from the user: wrong path, wrong file, wrong option."""


class ModelLoadError(UserError):
    """A checkpoint or config could not be turned into a model."""


class BundleError(UserError):
    """A bundle on disk is missing, damaged, tampered with, or from an unknown version."""


class ExportError(PtqdError):
    """The exported graph does not compute what the source model computes."""


class MissingDependencyError(UserError):
    """An optional backend (TensorRT, onnxruntime-gpu, ...) is not installed."""


class NonFiniteError(UserError, ValueError):
    """A number that must be finite is NaN or infinite (an option, a model fact, an engine input)."""


class EngineInputError(UserError, ValueError):
    """An engine was given inputs it cannot run on (shape, NaN/Inf): refused before inference."""
