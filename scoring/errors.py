"""Exception hierarchy shared by every package.

`scoring` is the bottom of the import graph (node -> dicom_io -> scoring), so the
root lives here.  Every error the node raises on bad input is an `InputError`
whose message names the problem in one line; boundaries (CLI, SCP, worker)
turn it into an exit status, a DIMSE status or a study failure reason.
"""

from __future__ import annotations


class SclcNodeError(Exception):
    """Root of every error raised by sclc-risk-node."""

    #: Whether retrying the same operation later could succeed (e.g. PACS down).
    retryable: bool = False


class InputError(SclcNodeError, ValueError):
    """The data we were given is unusable; the message says exactly why."""


class ClinicalRecordError(InputError):
    """One or more clinical fields are missing or out of range.

    ``problems`` lists each problem as ``"field: value ... (allowed: ...)"``.
    """

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("invalid clinical record: " + "; ".join(self.problems))


class ModelFileError(InputError):
    """A frozen model file is malformed, incomplete, tampered with or incompatible."""


class MaskError(InputError):
    """A region of interest is empty or unusable (e.g. empty tumour mask, empty ring)."""


class FeatureExtractionError(InputError):
    """pyradiomics could not compute a feature the model needs."""
