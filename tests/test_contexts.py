"""Contexts proposed for sending instances, and their running count."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dicomnet.contexts import (
    DEFAULT_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    ContextCount,
    contexts_for_instances,
)

JPEG = "1.2.840.10008.1.2.4.50"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def test_one_context_per_pair_plus_a_conversion_fallback() -> None:
    pairs = [(CT, UNCOMPRESSED_TRANSFER_SYNTAXES[1]), (CT, JPEG), (CT, JPEG), (MR, None)]
    contexts = contexts_for_instances(pairs)
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (CT, (UNCOMPRESSED_TRANSFER_SYNTAXES[1],)),
        (CT, (JPEG,)),
        (MR, DEFAULT_TRANSFER_SYNTAXES),
        (CT, UNCOMPRESSED_TRANSFER_SYNTAXES),
    ]


pair = st.tuples(
    st.sampled_from([f"1.2.{i}" for i in range(8)]),
    st.sampled_from([*UNCOMPRESSED_TRANSFER_SYNTAXES, JPEG, None]),
)


@given(st.lists(pair, min_size=1, max_size=40))
def test_running_count_agrees_with_the_contexts(pairs: list[tuple[str, str | None]]) -> None:
    count = ContextCount()
    for i, (sop, ts) in enumerate(pairs):
        assert count.with_(sop, ts) == len(contexts_for_instances(pairs[: i + 1]))
        count.add(sop, ts)
    assert len(count) == len(contexts_for_instances(pairs))
