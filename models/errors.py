"""The domain errors of pathguard, in one place.

Every error a user can cause (a missing dataset file, a bundle that does not verify, a component used before it
was fitted) derives from :class:`PathguardError`; the command line prints such an error as one line, and the
service maps the ones a request can cause to HTTP status codes in ``pathguard.service.errors``.
"""

from __future__ import annotations

__all__ = [
    "BundleCompatibilityError",
    "BundleError",
    "BundleIntegrityError",
    "ClassifierLoadError",
    "DatasetError",
    "NotCalibratedError",
    "NotFittedError",
    "PathguardError",
    "PathguardWarning",
    "UnsupportedModelError",
]


class PathguardError(Exception):
    """Base of every pathguard domain error."""


class PathguardWarning(UserWarning):
    """Base of pathguard's warnings: something worked, at a cost the user should know (the command line prints
    each as one line)."""


class NotFittedError(PathguardError, ValueError, AttributeError):
    """A fitted component (class paths, an EP or NIC detector, a calibration) was used before ``fit``.

    A ``ValueError`` and an ``AttributeError``, like scikit-learn's ``NotFittedError``.
    """


class NotCalibratedError(NotFittedError):
    """A fitted component was used before its calibration step."""


class DatasetError(PathguardError, RuntimeError):
    """A dataset file is missing or corrupt."""


class ClassifierLoadError(PathguardError, RuntimeError):
    """A classifier folder is incomplete or inconsistent."""


class UnsupportedModelError(PathguardError, ValueError):
    """A classifier file cannot be imported: malformed, or an operator or pattern pathguard does not support."""


class BundleError(PathguardError, RuntimeError):
    """A bundle cannot be used."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, altered, or not listed in the manifest.

    Attributes
    ----------
    file : str
        The offending file, relative to the bundle folder.
    """

    def __init__(self, file: str, message: str) -> None:
        super().__init__(message)
        self.file = file


class BundleCompatibilityError(BundleError):
    """The bundle needs a newer schema, pathguard or ONNX opset than this installation offers."""
