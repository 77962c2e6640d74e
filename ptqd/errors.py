"""One error hierarchy for ptqd, split three ways by what the CLI does with it:

* ``UserError`` (and subclasses): the input was wrong. One line, exit 1, no traceback (``--debug``
  shows it).
* ``ValidationError`` (and ``ExportError``): a check of ptqd's own output failed (an export vs torch,
  an engine vs its fake-quant model). One line naming the check, exit 1: the bundle was left as it was.
* ``InternalError``, and anything else escaping the CLI: a bug in ptqd. Its traceback, a line asking
  for a report, exit 2.

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


class ValidationError(PtqdError):
    """A check of what ptqd made failed; ``check`` names it (e.g. "engine vs fake-quant model")."""

    def __init__(self, check: str, detail: str):
        self.check = check
        super().__init__(f"validation failed ({check}): {detail}")


class ExportError(ValidationError):
    """The exported graph does not compute what the source model computes (or could not be made)."""

    def __init__(self, detail: str, check: str = "export vs torch"):
        super().__init__(check, detail)


class InternalError(PtqdError):
    """ptqd broke one of its own invariants (e.g. its TensorRT graph writer made a graph its linter
    rejects): a bug, reported with its traceback and exit code 2."""


class MissingDependencyError(UserError):
    """An optional backend (TensorRT, onnxruntime-gpu, ...) is not installed."""


class NonFiniteError(UserError, ValueError):
    """A number that must be finite is NaN or infinite (an option, a model fact, an engine input)."""


class EngineInputError(UserError, ValueError):
    """An engine was given inputs it cannot run on (shape, NaN/Inf): refused before inference."""
