"""Run one fuzz target under atheris (libFuzzer): ``python fuzz/run.py TARGET [libFuzzer args]``.

TARGET is one of ``pdu``, ``ul``, ``dimse``, ``identifier``, ``dataset``
(fuzz/targets.py). Without a corpus directory among the arguments, ``fuzz/corpus/TARGET``
is used (read and grown: give a scratch directory first to keep the checked-in seeds as
they are). See fuzz/README.md.
"""

from __future__ import annotations

import os
import sys
import warnings

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["dicomnet", "fuzz"]):
    # What the targets import only when first called must be imported (and so
    # instrumented) here too, or its coverage would not guide the fuzzer.
    import dicomnet.pacs.index
    import dicomnet.pacs.worklist_matching
    import dicomnet.services.commitment
    import dicomnet.services.mpps
    import dicomnet.services.qr
    import dicomnet.storage  # noqa: F401
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer arguments]")
    name = sys.argv[1]
    args = sys.argv[2:]
    if not any(not arg.startswith("-") for arg in args):
        here = os.path.dirname(os.path.abspath(__file__))
        args.append(os.path.join(here, "corpus", name))
    warnings.simplefilter("ignore")  # pydicom warns about every odd element it reads
    import logging

    logging.disable(logging.CRITICAL)
    atheris.Setup([sys.argv[0], *args], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
