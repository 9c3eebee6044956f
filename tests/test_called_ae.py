"""`serve` and the AE title it is called by (PS3.8 §7.1.1.4, Table 9-21): with `--aet`,
an association calling another title is rejected, unless `--any-called-ae`; without
`--aet`, the embedded default answers any title, as DCMTK's storescp does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from peers import HOST, DicomnetServer, describe_cli, echoscu, run_dicomnet

ServerFactory = Callable[..., DicomnetServer]


@pytest.mark.timeout(60)
def test_a_named_serve_rejects_another_called_title(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server(aet="PACS")
    wrong = run_dicomnet(["echo", HOST, server.port])  # calls ANY-SCP
    assert wrong.returncode == 1, describe_cli(wrong)
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and "called-AE-title-not-recognized" in lines[0], describe_cli(wrong)
    assert "check aec / --aec" in lines[0]
    assert "called AE title 'ANY-SCP' is not ours, 'PACS'" in server.log_text()
    right = run_dicomnet(["echo", HOST, server.port, "--aec", "PACS"])
    assert right.returncode == 0, describe_cli(right)
    # DCMTK's spelling of the flags reads the same.
    dcmtk_style = run_dicomnet(["echo", HOST, server.port, "-aet", "ME", "-aec", "PACS", "-v"])
    assert dcmtk_style.returncode == 0, describe_cli(dcmtk_style)
    assert "'ME'" in server.log_text()


@pytest.mark.timeout(60)
def test_any_called_ae_and_the_unnamed_default_answer_any_title(
    dicomnet_server: ServerFactory,
) -> None:
    named = dicomnet_server(aet="PACS", extra_args=["--any-called-ae"])
    unnamed = dicomnet_server()
    for server in (named, unnamed):
        result = run_dicomnet(["echo", HOST, server.port, "--aec", "SOMEONE-ELSE"])
        assert result.returncode == 0, describe_cli(result)


@pytest.mark.dcmtk
@pytest.mark.timeout(60)
def test_dcmtk_echoscu_calling_another_title_is_rejected(dicomnet_server: ServerFactory) -> None:
    server = dicomnet_server(aet="PACS")
    assert echoscu(server.port, aec="ANY-SCP").returncode != 0
    assert echoscu(server.port, aec="PACS").returncode == 0
