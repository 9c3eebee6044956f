"""dicomnet against pynetdicom, in both directions (issue 2, "Must show").

- pynetdicom as SCU -> ``dicomnet serve``: echo; store of corpus files in their
  own transfer syntaxes (compressed and deflated included), sent as-is from disk,
  stored byte-identical; data sets pynetdicom encodes itself, stored as encoded.
- pynetdicom as SCP <- ``dicomnet store``: every file received in its own
  transfer syntax, data set byte-identical to the source's; statuses decide the
  exit code (failure -> non-zero, warning -> zero).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from corpus import Corpus, CorpusFile
from peers import (
    DICOMNET_AET,
    HOST,
    VERIFICATION,
    Expected,
    PynetdicomSCPFactory,
    ServerFactory,
    StoreSCPFactory,
    dataset_bytes,
    describe_cli,
    describe_difference,
    pynetdicom_ae,
    pynetdicom_chunked_send,
    pynetdicom_echo,
    pynetdicom_send_echo,
    read_part10,
    run_dicomnet,
    stray_files,
    verify_part10_received,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

SERVER_AET = DICOMNET_AET


def _sendable(corpus: Corpus) -> list[CorpusFile]:
    """Small files whose file meta names the same instance as the data set
    (pynetdicom's as-is sending takes the Affected SOP Instance UID from the meta)."""
    return [f for f in corpus.small if f.meta_agrees]


# --------------------------------------------------------------------------
# pynetdicom as SCU -> dicomnet serve


def test_pynetdicom_echo(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server()
    outcome = pynetdicom_echo(server.port, aec=SERVER_AET)
    assert outcome.established and not outcome.rejected, outcome
    assert outcome.status == 0x0000, outcome
    # Several echoes on one association, then a clean release.
    ae = pynetdicom_ae()
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, server.port, ae_title=SERVER_AET)
    assert assoc.is_established
    try:
        for _ in range(5):
            assert pynetdicom_send_echo(assoc).Status == 0x0000
        assoc.release()
        assert assoc.is_released
    finally:
        if assoc.is_established:
            assoc.abort()
    assert server.alive()


@pytest.mark.timeout(180)
def test_pynetdicom_store_files_as_is(corpus: Corpus, dicomnet_server: ServerFactory) -> None:
    """Every small corpus file, compressed / deflated / big endian included, sent
    by pynetdicom straight from disk in its own transfer syntax: status 0x0000 and
    a stored data set equal to the file's."""
    files = _sendable(corpus)
    assert {f.transfer_syntax_uid for f in files} >= {
        "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2",
    }  # fmt: skip
    server = dicomnet_server()
    ae = pynetdicom_ae()
    for sop, ts in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files}):
        ae.add_requested_context(sop, [ts])
    statuses: dict[str, int | None] = {}
    with pynetdicom_chunked_send():
        assoc = ae.associate(HOST, server.port, ae_title=SERVER_AET)
        assert assoc.is_established, "association not accepted"
        try:
            rejected = [(cx.abstract_syntax, cx.transfer_syntax) for cx in assoc.rejected_contexts]
            assert not rejected, f"dicomnet serve rejected contexts: {rejected}"
            for f in files:
                rsp = assoc.send_c_store(f.path)
                statuses[f.rel] = int(rsp.Status) if "Status" in rsp else None
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
    failed = {rel: s for rel, s in statuses.items() if s != 0x0000}
    assert not failed, f"non-success statuses: {failed}"

    stored = server.wait_stored(f.sop_instance_uid for f in files)
    expected = [
        Expected(f.sop_instance_uid, f.sop_class_uid, f.transfer_syntax_uid, f.path, f.rel)
        for f in files
    ]
    problems = verify_part10_received(expected, stored, filename_is_uid=True)
    assert not problems, "\n".join(problems)
    assert not stray_files(server.storage, keep=stored.values())


@pytest.mark.parametrize(
    "context_ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"]
)
def test_pynetdicom_store_dataset_objects(
    corpus: Corpus, dicomnet_server: ServerFactory, context_ts: str
) -> None:
    """A pydicom Dataset that pynetdicom encodes for the accepted context (converting
    explicit -> implicit where needed): stored exactly as encoded on the wire, with
    the context's transfer syntax in the file meta."""
    from pynetdicom.dsutils import encode

    ds = pydicom.dcmread(corpus.by_source("CT_small.dcm").path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    wire = encode(ds, context_ts == ImplicitVRLittleEndian, True)
    assert wire

    server = dicomnet_server()
    ae = pynetdicom_ae()
    ae.add_requested_context(ds.SOPClassUID, [context_ts])
    assoc = ae.associate(HOST, server.port, ae_title=SERVER_AET)
    assert assoc.is_established
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == context_ts
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0x0000, rsp
        assoc.release()
    finally:
        if assoc.is_established:
            assoc.abort()

    stored = server.wait_stored([ds.SOPInstanceUID])
    path = stored.get(ds.SOPInstanceUID)
    assert path is not None, f"not stored; storage holds {sorted(server.files())}"
    meta, data = read_part10(path)
    assert meta.TransferSyntaxUID == context_ts
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert describe_difference(wire, data) is None, describe_difference(wire, data)
    # Decodes back to the same elements.
    back = pydicom.dcmread(path)
    assert back.PatientName == ds.PatientName and back.PixelData == ds.PixelData


# --------------------------------------------------------------------------
# dicomnet store -> pynetdicom as SCP


@pytest.mark.timeout(400)
def test_dicomnet_store_to_pynetdicom_scp(
    corpus: Corpus, pynetdicom_scp: PynetdicomSCPFactory
) -> None:
    """The whole corpus folder (the >100 MB instance included) to a pynetdicom SCP
    accepting every transfer syntax: every instance received in its own transfer
    syntax, data set byte-identical, our --aet used as the calling AE title."""
    scp = pynetdicom_scp()
    result = run_dicomnet(
        ["store", HOST, scp.port, corpus.root, "--aec", scp.aet, "--aet", "DNSTORE"],
        timeout=360,
    )
    assert result.returncode == 0, describe_cli(result)
    assert not scp.errors, scp.errors
    problems = []
    want = {f.sop_instance_uid: f for f in corpus.files}
    for uid in sorted(scp.received.keys() - want.keys()):
        problems.append(f"unexpected Affected SOP Instance UID {uid}")
    for uid, f in want.items():
        got = scp.received.get(uid)
        if got is None:
            problems.append(f"{f.rel}: {uid} not received")
            continue
        if got.sop_class_uid != f.sop_class_uid:
            problems.append(f"{f.rel}: SOP class {got.sop_class_uid} != {f.sop_class_uid}")
        if got.transfer_syntax_uid != f.transfer_syntax_uid:
            problems.append(
                f"{f.rel}: sent in {got.transfer_syntax_uid}, file is {f.transfer_syntax_uid}"
            )
        if got.calling_aet != "DNSTORE":
            problems.append(f"{f.rel}: calling AE title {got.calling_aet!r}")
        diff = describe_difference(dataset_bytes(f.path), got.path.read_bytes())
        if diff:
            problems.append(f"{f.rel}: data set differs: {diff}")
    assert not problems, "\n".join(problems) + "\n" + describe_cli(result)


@pytest.mark.parametrize(
    ("status", "should_fail"),
    [(0xA700, True), (0xC000, True), (0xB000, False)],
    ids=["out-of-resources", "cannot-understand", "warning-coercion"],
)
@pytest.mark.timeout(120)
def test_dicomnet_store_exit_code_follows_statuses(
    corpus: Corpus, pynetdicom_scp: PynetdicomSCPFactory, status: int, should_fail: bool
) -> None:
    """One instance answered with a failure (or a warning) status: the exit code is
    non-zero for a failure, zero for a warning, and the other files are still sent."""
    victim = corpus.by_source("CT_small.dcm")
    scp = pynetdicom_scp(fail_uids={victim.sop_instance_uid: status})
    result = run_dicomnet(["store", HOST, scp.port, corpus.small_root, "--aec", scp.aet],
                          timeout=100)  # fmt: skip
    if should_fail:
        assert result.returncode != 0, describe_cli(result)
    else:
        assert result.returncode == 0, describe_cli(result)
    assert victim.sop_instance_uid in scp.received, describe_cli(result)
    assert len(scp.received) == len(corpus.small), (
        f"only {len(scp.received)} of {len(corpus.small)} files sent around the "
        f"{status:#06x} status\n{describe_cli(result)}"
    )


@pytest.mark.dcmtk
def test_harness_pynetdicom_as_is_matches_storescp_bit_preserving(
    corpus: Corpus, storescp: StoreSCPFactory
) -> None:
    """Harness check, no dicomnet involved: pynetdicom's as-is sending and DCMTK's
    storescp +B agree with this suite's Part-10 parsing and comparison, so a failure
    elsewhere points at dicomnet, not at the referee."""
    files = _sendable(corpus)
    scp = storescp()
    ae = pynetdicom_ae()
    for sop, ts in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files}):
        ae.add_requested_context(sop, [ts])
    with pynetdicom_chunked_send():
        assoc = ae.associate(HOST, scp.port, ae_title=scp.aet)
        assert assoc.is_established
        try:
            for f in files:
                assert assoc.send_c_store(f.path).Status == 0x0000, f.rel
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
    received = scp.wait_received(len(files))
    expected = [
        Expected(f.sop_instance_uid, f.sop_class_uid, f.transfer_syntax_uid, f.path, f.rel)
        for f in files
    ]
    problems = verify_part10_received(expected, received, filename_is_uid=False)
    assert not problems, "\n".join(problems)


def test_harness_part10_offsets_agree_with_pynetdicom(corpus: Corpus) -> None:
    """Harness check: our data set offset equals pynetdicom's split_dataset()."""
    from peers import split_part10
    from pynetdicom.dsutils import split_dataset

    for f in corpus.files:
        ours = split_part10(f.path)[1]
        theirs = split_dataset(Path(f.path))[1]
        assert ours == theirs, f.rel


class _FakeAssociation:
    """Answers `send_c_echo` from a script; each item may log like pynetdicom first."""

    def __init__(self, script: list[tuple[str | None, int | None]]) -> None:
        self.script = script
        self.sent = 0
        self.is_established = True
        self.dimse_timeout = 120.0

    def send_c_echo(self) -> Dataset:
        warning, status = self.script[self.sent]
        self.sent += 1
        if warning is not None:
            logging.getLogger("pynetdicom").warning(warning)
        rsp = Dataset()
        if status is not None:
            rsp.Status = status
        return rsp


def test_echo_helper_resends_only_a_response_pynetdicom_dropped() -> None:
    dropped = "Received unexpected C-ECHO service message"
    assoc = _FakeAssociation([(dropped, None), (None, 0x0000)])
    assert pynetdicom_send_echo(assoc).Status == 0x0000
    assert assoc.sent == 2 and assoc.dimse_timeout == 120.0
    # No response and no word from pynetdicom that one came: not sent again.
    silent = _FakeAssociation([(None, None), (None, 0x0000)])
    assert "Status" not in pynetdicom_send_echo(silent)
    assert silent.sent == 1
