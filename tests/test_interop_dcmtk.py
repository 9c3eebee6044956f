"""dicomnet against DCMTK, in both directions (issue 2, "Must show").

- DCMTK ``echoscu`` and ``storescu`` -> ``dicomnet serve``: every corpus file is
  stored, its data set byte-identical to what crossed the wire. What crossed the
  wire is established independently: the same storescu command line sent to
  DCMTK's own ``storescp +B`` (bit-preserving), whose received data set is the
  reference (storescu re-encodes some files, so the source file is not).
- ``dicomnet echo`` and ``dicomnet store`` -> DCMTK ``storescp +B``: every file
  received, data set byte-identical to the source file's (dicomnet streams the
  bytes after the file meta), exit codes right.
- Association rejection as echoscu sees it: not in ``--allow`` -> "Calling AE
  Title Not Recognized"; past ``--max-associations 1`` -> transient "Local Limit
  Exceeded" while the first association completes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from corpus import LARGE_MIN_BYTES, REQUIRED_TRANSFER_SYNTAXES, Corpus
from peers import (
    DICOMNET_AET,
    HOST,
    VERIFICATION,
    AssociationRefused,
    Expected,
    RawAssociation,
    ServerFactory,
    StoreSCPFactory,
    dataset_bytes,
    describe_cli,
    echoscu,
    free_port,
    is_listening,
    pynetdicom_ae,
    pynetdicom_echo,
    pynetdicom_send_echo,
    run_dicomnet,
    storescu,
    stray_files,
    verify_part10_received,
    wait_until,
    write_storescu_config,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file

SERVER_AET = DICOMNET_AET


def test_corpus_is_varied(corpus: Corpus) -> None:
    """The corpus itself: the transfer syntaxes, sizes and shapes issue 2 asks for."""
    assert not corpus.missing_required(), corpus.summary()
    have = corpus.transfer_syntaxes()
    for name, uid in REQUIRED_TRANSFER_SYNTAXES.items():
        assert uid in have, f"no {name} file"
    assert corpus.large is not None and corpus.large.size >= LARGE_MIN_BYTES
    assert any(f.frames > 1 and f.source != "generated" for f in corpus.files), "multi-frame"
    assert len({f.sop_class_uid for f in corpus.files}) >= 8, "several SOP classes"
    assert len({f.sop_instance_uid for f in corpus.files}) == len(corpus.files)
    assert max(f.rel.count("/") for f in corpus.files) >= 4, "nested subfolders"
    assert any(not f.meta_agrees for f in corpus.files), "a file whose meta disagrees"


def _corpus_config(corpus: Corpus, tmp_path: Path) -> tuple[Path, str]:
    return write_storescu_config(
        ((f.sop_class_uid, f.transfer_syntax_uid) for f in corpus.files), tmp_path / "scu.cfg"
    )


# --------------------------------------------------------------------------
# DCMTK as SCU -> dicomnet serve


@pytest.mark.dcmtk
def test_echoscu_to_dicomnet_serve(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server()
    result = echoscu(server.port, aec=SERVER_AET)
    assert result.returncode == 0, result
    assert "Received Echo Response (Success)" in result.output, result
    # A second association on the same server works too.
    again = echoscu(server.port, aec=SERVER_AET, extra_args=["--repeat", "3"])
    assert again.returncode == 0, again
    assert again.output.count("Received Echo Response (Success)") == 3, again
    assert server.alive()


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_storescu_corpus_to_dicomnet_serve(
    corpus: Corpus, tmp_path: Path, storescp: StoreSCPFactory, dicomnet_server: ServerFactory
) -> None:
    """storescu sends the whole corpus folder (recursive, each file in its own
    transfer syntax); dicomnet stores every instance as `<SOPInstanceUID>.dcm`
    whose data set equals, byte for byte, what storescp +B got from the same
    storescu command."""
    config = _corpus_config(corpus, tmp_path)
    uids = {f.sop_instance_uid for f in corpus.files}

    # The reference: what crosses the wire, as DCMTK's bit-preserving storescp sees it.
    reference = storescp()
    ref_run = storescu(reference.port, [corpus.root], config=config, aec=reference.aet)
    assert ref_run.returncode == 0, ref_run
    ref_files = reference.wait_received(len(uids))
    assert set(ref_files) == uids, f"harness: storescp +B did not get the corpus\n{ref_run}"
    assert "Converting transfer syntax: " not in re.sub(
        r"Converting transfer syntax: (.+) -> \1\n", "", ref_run.output
    ), f"harness: storescu converted a file\n{ref_run}"

    server = dicomnet_server()
    run = storescu(server.port, [corpus.root], config=config, aec=SERVER_AET)
    assert run.returncode == 0, run
    successes = run.output.count("Received Store Response (Success)")
    assert successes == len(uids), f"{successes} of {len(uids)} stores succeeded\n{run}"

    stored = server.wait_stored(uids)
    expected = []
    for f in corpus.files:
        expected.append(
            Expected(
                uid=f.sop_instance_uid,
                sop_class_uid=f.sop_class_uid,
                transfer_syntax_uid=f.transfer_syntax_uid,
                reference=ref_files[f.sop_instance_uid],
                label=f.rel,
            )
        )
    problems = verify_part10_received(expected, stored, filename_is_uid=True)
    assert not problems, "\n".join(problems)
    strays = stray_files(server.storage, keep=stored.values())
    assert not strays, f"files other than the stored instances: {strays}"
    assert server.alive()


# --------------------------------------------------------------------------
# dicomnet as SCU -> DCMTK storescp: StoreSCPFactory


@pytest.mark.dcmtk
def test_dicomnet_echo_to_storescp(storescp: StoreSCPFactory) -> None:
    scp = storescp()
    result = run_dicomnet(["echo", HOST, scp.port, "--aec", scp.aet, "--count", "3"], timeout=60)
    assert result.returncode == 0, describe_cli(result)
    seen = wait_until(lambda: scp.log_text(None).count("Received Echo Request") >= 3, 5)
    assert seen, f"storescp did not log 3 echo requests\n{scp.log_text()}"
    assert scp.log_text(None).count("Received Echo Request") == 3, scp.log_text()


@pytest.mark.dcmtk
def test_dicomnet_echo_exit_codes_on_failure(storescp: StoreSCPFactory) -> None:
    # A peer that refuses every association (storescp --refuse).
    refusing = storescp(extra_args=["--refuse"])
    result = run_dicomnet(["echo", HOST, refusing.port, "--aec", refusing.aet], timeout=60)
    assert result.returncode != 0, describe_cli(result)
    assert "Association Received" in refusing.log_text(), "harness: storescp saw no request"

    # Nobody listening at all.
    port = free_port()
    assert not is_listening(port)
    result = run_dicomnet(["echo", HOST, port], timeout=60)
    assert result.returncode != 0, describe_cli(result)


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dicomnet_store_corpus_to_storescp(corpus: Corpus, storescp: StoreSCPFactory) -> None:
    """`dicomnet store FOLDER` sends every file (recursively) in its own transfer
    syntax; storescp +B receives data sets identical to the source files'. The
    Affected SOP Instance UID is the data set's, even where the file meta disagrees."""
    scp = storescp()
    result = run_dicomnet(
        ["store", HOST, scp.port, corpus.root, "--aec", scp.aet, "--aet", "DICOMNETSCU"],
        timeout=360,
    )
    assert result.returncode == 0, describe_cli(result)
    received = scp.wait_received(len(corpus.files))
    expected = [
        Expected(f.sop_instance_uid, f.sop_class_uid, f.transfer_syntax_uid, f.path, f.rel)
        for f in corpus.files
    ]
    problems = verify_part10_received(expected, received, filename_is_uid=False)
    assert not problems, "\n".join(problems) + "\n" + describe_cli(result)
    # The summary (DESIGN.md: sent / warning / failed and MB/s) counts every file.
    summary = result.stdout + result.stderr
    assert str(len(corpus.files)) in re.findall(r"\d+", summary), describe_cli(result)
    assert "MB/s" in summary, describe_cli(result)
    log = scp.log_text(None)
    assert log.count("Received Store Request") == len(corpus.files), log[-5000:]


@pytest.mark.dcmtk
@pytest.mark.timeout(180)
def test_dicomnet_store_concurrency_to_storescp(corpus: Corpus, storescp: StoreSCPFactory) -> None:
    """`--concurrency 4` over the small files, to a forking storescp."""
    scp = storescp(extra_args=["--fork"])
    result = run_dicomnet(
        ["store", HOST, scp.port, corpus.small_root, "--aec", scp.aet, "--concurrency", "4"],
        timeout=150,
    )
    assert result.returncode == 0, describe_cli(result)
    received = scp.wait_received(len(corpus.small))
    expected = [
        Expected(f.sop_instance_uid, f.sop_class_uid, f.transfer_syntax_uid, f.path, f.rel)
        for f in corpus.small
    ]
    problems = verify_part10_received(expected, received, filename_is_uid=False)
    assert not problems, "\n".join(problems) + "\n" + describe_cli(result)


@pytest.mark.dcmtk
def test_dicomnet_store_exit_code_when_refused(corpus: Corpus, storescp: StoreSCPFactory) -> None:
    refusing = storescp(extra_args=["--refuse"])
    one = corpus.by_source("CT_small.dcm").path
    result = run_dicomnet(["store", HOST, refusing.port, one, "--aec", refusing.aet], timeout=60)
    assert result.returncode != 0, describe_cli(result)
    assert refusing.received() == {}


# --------------------------------------------------------------------------
# association rejection


@pytest.mark.dcmtk
def test_not_allowed_calling_aet_rejected(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server(allow=["GOODAET"])

    bad = echoscu(server.port, aet="BADAET", aec=SERVER_AET)
    assert bad.returncode != 0, bad
    assert "Association Rejected" in bad.output, bad
    assert "Source: Service User" in bad.output, bad
    assert "Reason: Calling AE Title Not Recognized" in bad.output, bad

    # The same through the raw PDU: result permanent or transient, source 1
    # (service user), reason 3 (calling AE title not recognized), PS3.8 Table 9-21.
    with RawAssociation(server.port) as raw, pytest.raises(AssociationRefused) as info:
        raw.associate(calling="BADAET", called=SERVER_AET)
    rj = info.value.rejection
    assert rj is not None, f"expected A-ASSOCIATE-RJ, got PDU {info.value.pdu_type:#04x}"
    assert (rj.result in (1, 2), rj.source, rj.reason) == (True, 1, 3), rj

    good = echoscu(server.port, aet="GOODAET", aec=SERVER_AET)
    assert good.returncode == 0, good
    assert "Received Echo Response (Success)" in good.output, good
    assert server.alive()


@pytest.mark.dcmtk
@pytest.mark.timeout(120)
def test_max_associations_second_refused_transiently(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server(max_associations=1)
    ae = pynetdicom_ae("HOLDER")
    ae.add_requested_context(VERIFICATION)
    first = ae.associate(HOST, server.port, ae_title=SERVER_AET)
    try:
        assert first.is_established, "the first association was not accepted"

        second = echoscu(server.port, aec=SERVER_AET)
        assert second.returncode != 0, second
        assert "Association Rejected" in second.output, second
        assert "Result: Rejected Transient" in second.output, second
        assert "Reason: Local Limit Exceeded" in second.output, second

        # Raw: result 2 (transient), source 3 (service-provider presentation),
        # reason 2 (local limit exceeded).
        with RawAssociation(server.port) as raw, pytest.raises(AssociationRefused) as info:
            raw.associate(called=SERVER_AET)
        rj = info.value.rejection
        assert rj is not None, f"expected A-ASSOCIATE-RJ, got PDU {info.value.pdu_type:#04x}"
        assert (rj.result, rj.source, rj.reason) == (2, 3, 2), rj

        # The first association was not disturbed and completes.
        assert first.is_established
        status = pynetdicom_send_echo(first)
        assert "Status" in status and status.Status == 0x0000, status
        first.release()
        assert first.is_released
    finally:
        if first.is_established:
            first.abort()

    # The slot is free again: a new association is accepted (bounded retry while
    # the server notices the first one ended).
    outcomes = []

    def echo_ok() -> bool:
        outcomes.append(pynetdicom_echo(server.port, aec=SERVER_AET))
        return outcomes[-1].status == 0x0000

    assert wait_until(echo_ok, timeout=10, interval=0.5), outcomes[-3:]
    final = echoscu(server.port, aec=SERVER_AET)
    assert final.returncode == 0, final


@pytest.mark.dcmtk
@pytest.mark.timeout(120)
def test_dicomnet_store_pads_odd_deflated_data_set(
    tmp_path: Path, storescp: StoreSCPFactory
) -> None:
    """pydicom's image_dfl.dcm has an odd-length deflated stream; DCMTK refuses odd PDV
    lengths, so `dicomnet store` appends the trailing NUL of PS3.5 §A.5 when sending."""
    source = Path(get_testdata_file("image_dfl.dcm"))
    assert len(dataset_bytes(source)) % 2 == 1
    scp = storescp()
    result = run_dicomnet(["store", HOST, scp.port, source, "--aec", scp.aet], timeout=60)
    assert result.returncode == 0, describe_cli(result)
    (received,) = scp.wait_received(1).values()
    assert dataset_bytes(received) == dataset_bytes(source) + b"\x00"
    inflated = dcmread(received)
    assert inflated.SOPInstanceUID == dcmread(source).SOPInstanceUID
