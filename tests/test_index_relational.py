"""Relational queries and retrieves on the Query/Retrieve index (PS3.4 §C.4.1.3.2,
§C.4.2.3.2.1, §C.4.3.3.2.1), negotiated by SOP Class Extended Negotiation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import index_location
from test_index import Corpus, build_corpus, ident

from dicomnet.pacs.index import (
    INDEX_FILE_NAME,
    STATUS_IDENTIFIER_DOES_NOT_MATCH,
    Index,
    Level,
    Model,
    QueryError,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("storage")
    return Corpus(root, build_corpus(root))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, corpus: Corpus) -> Iterator[Index]:
    location = index_location(request, request.param, corpus.root / INDEX_FILE_NAME)
    with Index(location, root=corpus.root) as idx:
        idx.rebuild(corpus.root)
        yield idx


def test_series_by_patient_name_and_modality(corpus: Corpus, index: Index) -> None:
    """A SERIES-level query with only a patient key and a series key."""
    name = corpus.instances[0].patient_name
    modality = next(i.modality for i in corpus.instances if i.patient_name == name)
    expected = {
        i.series_uid for i in corpus.instances if i.patient_name == name and i.modality == modality
    }
    q = ident("SERIES", PatientName=name, Modality=modality, SeriesInstanceUID="")
    models: tuple[Model, ...] = ("patient", "study")
    for model in models:
        with pytest.raises(QueryError) as info:
            index.query(model, "SERIES", q)
        assert info.value.status == STATUS_IDENTIFIER_DOES_NOT_MATCH
        responses = index.query(model, "SERIES", q, relational=True)
        assert sorted(r.SeriesInstanceUID for r in responses) == sorted(expected)
    responses = list(index.query("patient", "SERIES", q, relational=True))
    assert {str(r.PatientName) for r in responses} == {name}
    assert {r.Modality for r in responses} == {modality}


def test_images_by_keys_of_every_level(corpus: Corpus, index: Index) -> None:
    inst = corpus.instances[5]
    expected = {
        i.instance_uid
        for i in corpus.instances
        if i.patient_id == inst.patient_id
        and i.study_date == inst.study_date
        and i.modality == inst.modality
        and i.instance_number == inst.instance_number
    }
    q = ident(
        "IMAGE",
        PatientID=inst.patient_id,
        StudyDate=inst.study_date,
        Modality=inst.modality,
        InstanceNumber=inst.instance_number,
        SOPInstanceUID="",
    )
    found = {r.SOPInstanceUID for r in index.query("patient", "IMAGE", q, relational=True)}
    assert found == expected and inst.instance_uid in found


def test_unique_keys_above_may_be_lists_or_patterns(corpus: Corpus, index: Index) -> None:
    studies = sorted(corpus.studies())[:2]
    q = ident("SERIES", StudyInstanceUID="\\".join(studies), SeriesInstanceUID="")
    expected = {i.series_uid for i in corpus.instances if i.study_uid in studies}
    found = {r.SeriesInstanceUID for r in index.query("study", "SERIES", q, relational=True)}
    assert found == expected
    q = ident("STUDY", PatientID="PID00*", StudyInstanceUID="")
    found = {r.StudyInstanceUID for r in index.query("patient", "STUDY", q, relational=True)}
    assert found == set(corpus.studies())


def test_keys_below_the_level_are_still_refused(index: Index) -> None:
    q = ident("STUDY", StudyInstanceUID="", Modality="CT")
    with pytest.raises(QueryError) as info:
        index.query("study", "STUDY", q, relational=True)
    assert info.value.offending == (0x00080060,)


@pytest.mark.parametrize(
    ("model", "level", "key"),
    [
        ("patient", "STUDY", "study"),
        ("patient", "SERIES", "series"),
        ("study", "SERIES", "series"),
        ("patient", "IMAGE", "instances"),
        ("study", "IMAGE", "instances"),
    ],
)
def test_relational_retrieve(
    corpus: Corpus, index: Index, model: Model, level: Level, key: str
) -> None:
    """Only the unique key of the retrieve level: a study by its Study Instance UID,
    a series by its Series Instance UID, instances by a list of SOP Instance UIDs."""
    inst = corpus.instances[7]
    if key == "study":
        q = ident(level, StudyInstanceUID=inst.study_uid)
        expected = {i.instance_uid for i in corpus.instances if i.study_uid == inst.study_uid}
    elif key == "series":
        q = ident(level, SeriesInstanceUID=inst.series_uid)
        expected = {i.instance_uid for i in corpus.instances if i.series_uid == inst.series_uid}
    else:
        expected = {i.instance_uid for i in corpus.instances[7:10]}
        q = ident(level, SOPInstanceUID="\\".join(sorted(expected)))
    with pytest.raises(QueryError) as info:
        index.files(model, level, q)
    assert info.value.status == STATUS_IDENTIFIER_DOES_NOT_MATCH
    found = {uid for _, _, uid, _ in index.files(model, level, q, relational=True)}
    assert found == expected
    assert index.count_files(model, level, q, relational=True) == len(expected)


def test_relational_retrieve_checks_what_is_given(corpus: Corpus, index: Index) -> None:
    inst = corpus.instances[0]
    other = next(i for i in corpus.instances if i.patient_id != inst.patient_id)
    q = ident("SERIES", PatientID=other.patient_id, SeriesInstanceUID=inst.series_uid)
    assert list(index.files("patient", "SERIES", q, relational=True)) == []
    q = ident("SERIES", PatientID=inst.patient_id, SeriesInstanceUID=inst.series_uid)
    assert index.count_files("patient", "SERIES", q, relational=True) > 0
    with pytest.raises(QueryError) as info:  # the retrieve level's own key is needed
        index.files(
            "patient", "SERIES", ident("SERIES", StudyInstanceUID=inst.study_uid), relational=True
        )
    assert info.value.offending == (0x0020000E,)
    with pytest.raises(QueryError):  # a key above, when given, is one value
        q = ident("SERIES", StudyInstanceUID=f"{inst.study_uid}\\1.2", SeriesInstanceUID="1")
        index.files("study", "SERIES", q, relational=True)


def test_stored_paths(corpus: Corpus, index: Index) -> None:
    inst = corpus.instances[3]
    q = ident("IMAGE", SOPInstanceUID=inst.instance_uid)
    ((path, sop_class, uid, syntax),) = index.files("study", "IMAGE", q, relational=True)
    assert (Path(path), sop_class, uid, syntax) == (
        inst.path,
        inst.sop_class,
        inst.instance_uid,
        inst.transfer_syntax,
    )
