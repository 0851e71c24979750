"""Patient and study attributes copied from the CT into the objects the node writes, made valid first.

A CT may carry values that break its own VRs: a PatientName of 601
characters (PN allows 64 per component group), bytes that are not valid in
its declared character set, control characters.  pydicom keeps a PN's
original bytes and writes them back unchanged when the character set is the
same (ISO_IR 192), so invalid UTF-8 would reach the PACS inside our SR.
``sanitised_header`` returns a copy in which every copied attribute is a
clean Unicode string within its VR's length (PS3.5 6.2):

* names (PN) and descriptive values: characters that did not decode become
  "?", control characters are dropped, each PN component group is cut to 64
  bytes of UTF-8, an LO/SH value to 64/16 bytes;
* identifiers (PatientID, AccessionNumber, StudyID): never shortened, since
  a shortened identifier could name another patient or study.  An
  over-length identifier raises ``DicomInputError`` naming the attribute and
  its length; the study then fails with that reason.
"""

from __future__ import annotations

import copy
import unicodedata

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from sclc_risk_node.dicom_io.errors import DicomInputError

#: keyword -> (VR, maximum characters per value or per PN component group)
COPIED_ATTRIBUTES: dict[str, tuple[str, int]] = {
    "PatientName": ("PN", 64),
    "PatientID": ("LO", 64),
    "PatientBirthDate": ("DA", 8),
    "PatientSex": ("CS", 16),
    "AccessionNumber": ("SH", 16),
    "StudyID": ("SH", 16),
    "StudyDate": ("DA", 8),
    "StudyTime": ("TM", 14),
    "ReferringPhysicianName": ("PN", 64),
    "StudyDescription": ("LO", 64),
    "InstitutionName": ("LO", 64),
}
_IDENTIFIERS = frozenset({"PatientID", "AccessionNumber", "StudyID"})
_PN_SEPARATORS = "^="


def clean_text(value: str, *, keep: str = "") -> str:
    """Drop control characters (not in ``keep``) and turn undecodable characters (U+FFFD) into "?"."""
    out = []
    for char in value:
        if char == "\ufffd":
            out.append("?")
        elif char in keep or unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(char)
    return "".join(out).strip()


def cut_to_bytes(text: str, max_bytes: int) -> str:
    """``text`` cut so that its UTF-8 encoding fits ``max_bytes``, never inside a character.

    PS3.5 counts characters, but validators (dciodvfy) and many archives count
    bytes; with a multi-byte ü, fitting the bytes satisfies both.
    """
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def clean_person_name(value: object, max_chars: int = 64) -> str:
    """A PN value as a clean string, each of its ≤3 component groups cut to ``max_chars``."""
    if isinstance(value, PersonName):
        text = str(value)  # decoded with replacement characters where the bytes were invalid
    elif isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        text = str(value or "")
    groups = clean_text(text).split("=")[:3]
    return "=".join(cut_to_bytes(group, max_chars) for group in groups).rstrip("=^")


def sanitised_header(header: Dataset) -> Dataset:
    """A copy of ``header`` whose copied patient/study attributes are valid (see the module docstring).

    Absent attributes stay absent; the caller's dataset is not changed.
    Raises ``DicomInputError`` for an over-length identifier.
    """
    header = copy.deepcopy(header)
    for keyword, (vr, max_chars) in COPIED_ATTRIBUTES.items():
        if keyword not in header:
            continue
        value = header[keyword].value
        if value is None or value == "":
            continue
        if vr == "PN":
            setattr(header, keyword, clean_person_name(value, max_chars))
            continue
        text = clean_text(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value))
        if len(text.encode("utf-8")) > max_chars:
            if keyword in _IDENTIFIERS:
                raise DicomInputError(
                    f"{keyword} of the CT is {len(text)} characters long; its VR {vr} allows {max_chars}, "
                    "and an identifier is never shortened (it could then name another patient or study)"
                )
            text = cut_to_bytes(text, max_chars)
        setattr(header, keyword, text)
    return header
