"""DICOM input errors: each message names the file/series and the problem in one line."""

from sclc_risk_node.scoring.errors import InputError


class DicomInputError(InputError):
    """A DICOM file, series or SEG cannot be used as given."""
