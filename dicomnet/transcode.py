"""Converting a data set to another transfer syntax, for a peer that does not accept the
one it is stored in (PS3.5 §8, §10; PS3.4 §B.4.1: an SCU may convert to a syntax the
SCP accepted).

Uncompressed and deflated syntaxes convert into each other always. A compressed one is
decompressed through pydicom's pixel data decoders (`pip install dicomnet[codecs]`:
numpy and the pylibjpeg plug-ins; RLE needs numpy alone). Compression is done only to a
lossless syntax with an encoder installed: an image is never made lossy on the way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from functools import cache

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnet.errors import NotNegotiatedError
from dicomnet.proto.contexts import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
)

__all__ = [
    "ConversionError",
    "can_convert",
    "conversion_target",
    "convert",
    "named_transfer_syntax",
    "transcodes",
    "why_not_convertible",
]

log = logging.getLogger("dicomnet")

_NATIVE = (*UNCOMPRESSED_TRANSFER_SYNTAXES, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
# Lossless compressed syntaxes that an encoder of pydicom's may produce (PS3.5 §8.2).
_LOSSLESS_TARGETS = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
)
CODECS_HINT = "pip install dicomnet[codecs]"

# Short names for the command line; the one-letter ones are DCMTK storescu's `-x?`
# proposal flags (`-xe`, `-xr`, ...), so that those read the same here.
TRANSFER_SYNTAX_NAMES = {
    "explicit": "1.2.840.10008.1.2.1",
    "e": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "i": "1.2.840.10008.1.2",
    "big": "1.2.840.10008.1.2.2",
    "b": "1.2.840.10008.1.2.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "d": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "r": "1.2.840.10008.1.2.5",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "y": "1.2.840.10008.1.2.4.50",
    "jpeg-extended": "1.2.840.10008.1.2.4.51",
    "x": "1.2.840.10008.1.2.4.51",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "s": "1.2.840.10008.1.2.4.70",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "t": "1.2.840.10008.1.2.4.80",
    "jpeg-ls-near": "1.2.840.10008.1.2.4.81",
    "u": "1.2.840.10008.1.2.4.81",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "v": "1.2.840.10008.1.2.4.90",
    "j2k": "1.2.840.10008.1.2.4.91",
    "w": "1.2.840.10008.1.2.4.91",
    "htj2k-lossless": "1.2.840.10008.1.2.4.201",
}


def named_transfer_syntax(text: str) -> str:
    """A transfer syntax UID from a UID or a name of `TRANSFER_SYNTAX_NAMES`; a
    `ValueError` that lists the names otherwise."""
    if text in TRANSFER_SYNTAX_NAMES:
        return TRANSFER_SYNTAX_NAMES[text]
    if re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", text) and len(text) <= 64:
        return text
    names = ", ".join(name for name in TRANSFER_SYNTAX_NAMES if len(name) > 1)
    raise ValueError(f"unknown transfer syntax {text!r}: give a UID or one of {names}")


class ConversionError(NotNegotiatedError):
    """The instance is not in an accepted transfer syntax and cannot be converted to one.
    `reason`: why not, in few words (e.g. for a retrieve's Error Comment)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _name(transfer_syntax: str) -> str:
    name = UID(transfer_syntax).name
    return name if name != transfer_syntax else f"transfer syntax {transfer_syntax}"


@cache
def _decoder_problem(transfer_syntax: str) -> str | None:
    """Why pixel data in `transfer_syntax` cannot be decoded here, or None."""
    if transfer_syntax in _NATIVE:
        return None
    try:
        import numpy  # noqa: F401  (pydicom's decoders return numpy arrays)
        from pydicom.pixels.decoders.base import get_decoder
    except ImportError:
        return f"decompressing {_name(transfer_syntax)} needs numpy ({CODECS_HINT})"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return f"no decoder exists for {_name(transfer_syntax)}"
    if not decoder.is_available:
        return f"no decoder for {_name(transfer_syntax)} is installed ({CODECS_HINT})"
    return None


@cache
def _encoder_available(transfer_syntax: str) -> bool:
    if transfer_syntax in _NATIVE:
        return True
    if transfer_syntax not in _LOSSLESS_TARGETS:
        return False
    try:
        import numpy  # noqa: F401
        from pydicom.pixels.encoders.base import get_encoder
    except ImportError:
        return False
    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_convert(source: str, target: str) -> bool:
    """A data set stored in `source` can be sent in `target`."""
    if source == target:
        return True
    return _decoder_problem(source) is None and _encoder_available(target)


def transcodes(source: str, target: str) -> bool:
    """Sending data stored in `source` in `target` changes its pixel data encoding."""
    return source != target and (source not in _NATIVE or target not in _NATIVE)


def why_not_convertible(source: str, targets: Iterable[str]) -> str:
    """The reason no conversion from `source` to any of `targets` exists."""
    problem = _decoder_problem(source)
    if problem is not None:
        return problem
    names = ", ".join(_name(t) for t in dict.fromkeys(targets)) or "none"
    return f"no encoder for the accepted syntaxes ({names})"


def conversion_target(source: str, accepted: Iterable[str]) -> str | None:
    """The syntax to convert to among `accepted`: the uncompressed ones first (Explicit VR
    Little Endian before the others), then a lossless compressed one with an encoder."""
    candidates = set(accepted)
    if source in candidates:
        return source
    order = (*_NATIVE, *_LOSSLESS_TARGETS)
    for target in sorted(candidates, key=lambda t: order.index(t) if t in order else len(order)):
        if can_convert(source, target):
            return target
    return None


def convert(dataset: Dataset, source: str, target: str) -> Dataset:
    """`dataset` (read in `source`) made ready to encode in `target`: pixel data
    decompressed when `source` is compressed, compressed when `target` is. Changes
    `dataset` in place and returns it; `ConversionError` says why it could not."""
    if source == target:
        return dataset
    problem = _decoder_problem(source)
    if problem is not None:
        raise ConversionError(problem)
    try:
        if source not in _NATIVE and "PixelData" in dataset:
            # The same instance in another syntax (PS3.5 §8): no new SOP Instance UID.
            dataset.decompress(generate_instance_uid=False)
        _set_syntax(dataset, EXPLICIT_VR_LITTLE_ENDIAN if target not in _NATIVE else target)
        if target not in _NATIVE:
            if "PixelData" in dataset:
                dataset.compress(target, generate_instance_uid=False)
            _set_syntax(dataset, target)
    except Exception as exc:  # a codec's failure on this instance: a reason, not a crash
        log.debug("conversion from %s to %s failed", source, target, exc_info=True)
        raise ConversionError(
            f"could not convert from {_name(source)} to {_name(target)}: {exc}"
        ) from exc
    return dataset


def _set_syntax(dataset: Dataset, transfer_syntax: str) -> None:
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        from pydicom.dataset import FileMetaDataset

        meta = dataset.file_meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(transfer_syntax)
