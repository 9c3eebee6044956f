"""Presentation contexts and their negotiation (PS3.8 §7.1.1.13, §9.3.2.2; PS3.7 Annex D).

Sans-IO. `PresentationContext` is what a side proposes (requestor) or supports
(acceptor); `AcceptedContext` is the negotiated outcome on one association.
SCP/SCU Role Selection is answered here with the contexts it qualifies; the other
extended negotiation items go through `dicomnet.proto.extended`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import AllTransferSyntaxes

from dicomnet.proto.extended import ExtendedNegotiation
from dicomnet.proto.memo import BoundedMemo, IdentityMemo
from dicomnet.proto.pdu import (
    AAssociateAC,
    AAssociateRQ,
    PresentationContextAC,
    PresentationContextResult,
    PresentationContextRQ,
    RoleSelection,
    UserInformation,
)

__all__ = [
    "DEFAULT_TRANSFER_SYNTAXES",
    "AcceptedContext",
    "ContextAnswers",
    "ContextCount",
    "PresentationContext",
    "all_storage_sop_classes",
    "build_requestor_contexts",
    "contexts_for_instances",
    "negotiate_as_acceptor",
]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)
DEFAULT_TRANSFER_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
QUERY_RETRIEVE = (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_MOVE,
    PATIENT_ROOT_GET,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    STUDY_ROOT_GET,
)

# The storage SOP classes most often sent, proposed by default (PS3.4 Annex B).
COMMON_STORAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform
)


# The compressed syntaxes, and deflate, that a C-GET SCU asks for one by one, so that
# instances stored in them arrive as stored (PS3.5 §8, §10).
RECEIVABLE_TRANSFER_SYNTAXES = (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
# The image classes most often stored compressed: a C-GET SCU proposes each of them in
# every one of RECEIVABLE_TRANSFER_SYNTAXES (8 x 11 of the 127 contexts it has).
COMPRESSED_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image - For Presentation
)


def receiving_contexts(limit: int = 127) -> list[PresentationContext]:
    """Storage contexts for a C-GET SCU, asking for the SCP role (PS3.7 §D.3.3.4), at
    most `limit` of them. Presentation contexts carry one transfer syntax each once
    accepted, so the common image classes are proposed once per compressed syntax
    (instances stored so arrive as stored) beside an uncompressed context; the other
    storage classes once, uncompressed (the sender converts what it holds compressed)."""

    def receive(uid: str, syntaxes: tuple[str, ...]) -> PresentationContext:
        return PresentationContext(uid, syntaxes, scu_role=False, scp_role=True)

    contexts = []
    for uid in COMPRESSED_IMAGE_SOP_CLASSES:
        contexts.append(receive(uid, UNCOMPRESSED_TRANSFER_SYNTAXES))
        contexts += [receive(uid, (ts,)) for ts in RECEIVABLE_TRANSFER_SYNTAXES]
    others = dict.fromkeys((*COMMON_STORAGE_SOP_CLASSES, *all_storage_sop_classes()))
    for uid in others:
        if len(contexts) >= limit:
            break
        if uid not in COMPRESSED_IMAGE_SOP_CLASSES:
            contexts.append(receive(uid, UNCOMPRESSED_TRANSFER_SYNTAXES))
    return contexts[:limit]


@cache
def all_storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class in pydicom's UID dictionary (Storage Commitment excluded)."""
    return tuple(
        uid
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class"
        and "Storage" in name
        and "Commitment" not in name
        and "Directory" not in name
    )


@cache
def all_transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax pydicom knows, uncompressed first."""
    rest = [str(ts) for ts in AllTransferSyntaxes if str(ts) not in UNCOMPRESSED_TRANSFER_SYNTAXES]
    return (
        *UNCOMPRESSED_TRANSFER_SYNTAXES,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        *sorted(set(rest) - {DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}),
    )


@dataclass(frozen=True, slots=True)
class PresentationContext:
    """An abstract syntax with the transfer syntaxes proposed (requestor) or supported.

    `scu_role` / `scp_role`: as requestor, the roles to ask for with SCP/SCU Role
    Selection (PS3.7 §D.3.3.4) (None: no role selection item); as acceptor, whether a
    requestor asking for that role gets it.
    """

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """A presentation context accepted on an association, from our side's point of view.

    `we_are_scu` / `we_are_scp`: the DIMSE roles this side may take on it.
    """

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    we_are_scu: bool = True
    we_are_scp: bool = False


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of negotiation as acceptor."""

    response: AAssociateAC
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    peer_max_pdu_length: int = 0


def contexts_for_instances(
    pairs: Iterable[tuple[str, str | None]], preferred: str | None = None
) -> list[PresentationContext]:
    """What to propose to send instances given as (SOP Class UID, transfer syntax) pairs.

    One context per pair, so each instance can go as it is (a None syntax: a data set in
    memory, Explicit or Implicit VR Little Endian); plus, per SOP class of a stored
    instance, one context of the uncompressed syntaxes to convert to when the peer does
    not accept the stored one (as DCMTK, dcm4che and Orthanc propose). `preferred`: a
    syntax to send in when accepted, proposed first for each SOP class.
    """
    unique = dict.fromkeys(pairs)
    contexts = []
    if preferred is not None:
        for sop in dict.fromkeys(sop for sop, _ in unique):
            contexts.append(PresentationContext(sop, (preferred,)))
    contexts += [
        PresentationContext(sop, (ts,) if ts else DEFAULT_TRANSFER_SYNTAXES)
        for sop, ts in unique
        if preferred is None or ts != preferred
    ]
    for sop in dict.fromkeys(sop for sop, ts in unique if ts is not None):
        contexts.append(PresentationContext(sop, UNCOMPRESSED_TRANSFER_SYNTAXES))
    return contexts


class ContextCount:
    """How many contexts `contexts_for_instances` makes, kept up as instances are added
    (so that splitting many files into associations of <= 128 contexts stays linear)."""

    def __init__(self, preferred: str | None = None) -> None:
        self._preferred = preferred
        self._pairs: set[tuple[str, str | None]] = set()
        self._classes: set[str] = set()
        self._fallbacks: set[str] = set()

    def __len__(self) -> int:
        return len(self._pairs) + len(self._fallbacks) + len(self._classes)

    def _new(self, sop_class_uid: str, transfer_syntax: str | None) -> tuple[int, int, int]:
        preferred = self._preferred is not None
        return (
            int(
                (sop_class_uid, transfer_syntax) not in self._pairs
                and not (preferred and transfer_syntax == self._preferred)
            ),
            int(transfer_syntax is not None and sop_class_uid not in self._fallbacks),
            int(preferred and sop_class_uid not in self._classes),
        )

    def with_(self, sop_class_uid: str, transfer_syntax: str | None) -> int:
        """The count if this instance were added."""
        return len(self) + sum(self._new(sop_class_uid, transfer_syntax))

    def add(self, sop_class_uid: str, transfer_syntax: str | None) -> None:
        if transfer_syntax != self._preferred or self._preferred is None:
            self._pairs.add((sop_class_uid, transfer_syntax))
        if transfer_syntax is not None:
            self._fallbacks.add(sop_class_uid)
        if self._preferred is not None:
            self._classes.add(sop_class_uid)


# The proposals built for recent associations, by what was proposed: a requestor that
# proposes the same contexts each time (the defaults, a pool's) builds them once, and the
# same tuple lets the Upper Layer reuse their encoding too.
_built: BoundedMemo[tuple[tuple[PresentationContextRQ, ...], tuple[RoleSelection, ...]]] = (
    BoundedMemo(32)
)


def build_requestor_contexts(
    contexts: Sequence[PresentationContext],
) -> tuple[tuple[PresentationContextRQ, ...], tuple[RoleSelection, ...]]:
    """Number the proposed contexts 1, 3, 5, ... (PS3.8 §9.3.2.2) with their role items."""
    key = tuple(contexts)
    try:
        known = _built.get(key)
    except TypeError:  # transfer syntaxes given as a list: not hashable, not remembered
        return _build_requestor_contexts(contexts)
    return known if known is not None else _built.put(key, _build_requestor_contexts(contexts))


def _build_requestor_contexts(
    contexts: Sequence[PresentationContext],
) -> tuple[tuple[PresentationContextRQ, ...], tuple[RoleSelection, ...]]:
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} presentation contexts proposed; at most 128 fit")
    items = tuple(
        PresentationContextRQ(2 * i + 1, ctx.abstract_syntax, tuple(ctx.transfer_syntaxes))
        for i, ctx in enumerate(contexts)
    )
    roles: dict[str, RoleSelection] = {}
    for ctx in contexts:
        if ctx.scu_role is not None or ctx.scp_role is not None:
            roles[ctx.abstract_syntax] = RoleSelection(
                ctx.abstract_syntax, bool(ctx.scu_role), bool(ctx.scp_role)
            )
    return items, tuple(roles.values())


# Recent outcomes of `accepted_as_requestor`, by the tuples they came from: the same
# proposal answered with the same bytes is given as the same tuples by the Upper Layer.
_accepted: IdentityMemo[dict[int, AcceptedContext]] = IdentityMemo(32)


def accepted_as_requestor(
    proposed: Iterable[PresentationContextRQ],
    response: AAssociateAC,
    requested_roles: Iterable[RoleSelection],
) -> dict[int, AcceptedContext]:
    """The contexts the acceptor accepted, with the roles it granted (PS3.7 Table D.3-10)."""
    sources = (
        proposed,
        response.presentation_contexts,
        requested_roles,
        response.user_information.role_selections,
    )
    if not all(isinstance(source, tuple) for source in sources):
        return _accepted_as_requestor(proposed, response, requested_roles)
    accepted = _accepted.get(*sources)
    if accepted is None:
        accepted = _accepted_as_requestor(proposed, response, requested_roles)
        _accepted.put(sources, accepted)
    return dict(accepted)  # the caller's own


def _accepted_as_requestor(
    proposed: Iterable[PresentationContextRQ],
    response: AAssociateAC,
    requested_roles: Iterable[RoleSelection],
) -> dict[int, AcceptedContext]:
    by_id = {ctx.context_id: ctx for ctx in proposed}
    asked = {role.sop_class_uid: role for role in requested_roles}
    granted = {role.sop_class_uid: role for role in response.user_information.role_selections}
    accepted: dict[int, AcceptedContext] = {}
    for ac in response.presentation_contexts:
        rq = by_id.get(ac.context_id)
        if rq is None or not ac.accepted:
            continue
        scu, scp = True, False
        if rq.abstract_syntax in asked:
            ask = asked[rq.abstract_syntax]
            grant = granted.get(rq.abstract_syntax)
            if grant is None:
                scu, scp = True, False  # defaults apply when the acceptor does not answer
            else:
                scu, scp = ask.scu_role and grant.scu_role, ask.scp_role and grant.scp_role
        accepted[ac.context_id] = AcceptedContext(
            ac.context_id, rq.abstract_syntax, ac.transfer_syntax, scu, scp
        )
    return accepted


def negotiate_as_acceptor(
    request: AAssociateRQ,
    supported: dict[str, PresentationContext],
    *,
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    extensions: Sequence[ExtendedNegotiation] = (),
    answers: ContextAnswers | None = None,
) -> Negotiated:
    """Answer each proposed context: the first proposed transfer syntax we support.

    Results per PS3.8 Table 9-18: abstract syntax not supported (3), transfer syntaxes
    not supported (4). Role selection per PS3.7 §D.3.3.4: a role the requestor asks
    for is granted when our context allows it. Each of `extensions` then adds its
    answer to the user information. `answers`, kept by the caller for as long as
    `supported` does not change, remembers the answers to the proposals seen.
    """
    proposed = request.presentation_contexts
    roles = request.user_information.role_selections
    if answers is None:
        results, accepted, granted_roles = _answer_contexts(proposed, roles, supported)
    else:
        results, accepted, granted_roles = answers.answer(proposed, roles, supported)
    user_information = UserInformation(
        max_length=max_pdu_length,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
        role_selections=granted_roles,
    )
    for extension in extensions:
        user_information = extension.answer(request.user_information, user_information)
    response = AAssociateAC(
        called_ae_title=request.called_ae_title,
        calling_ae_title=request.calling_ae_title,
        presentation_contexts=results,
        user_information=user_information,
    )
    return Negotiated(response, dict(accepted), request.user_information.max_length or 0)


_Answers = tuple[
    tuple[PresentationContextAC, ...], dict[int, AcceptedContext], tuple[RoleSelection, ...]
]


_Proposal = tuple[tuple[PresentationContextRQ, ...], tuple[RoleSelection, ...]]


class ContextAnswers:
    """An acceptor's answers to recent proposals, by what was proposed (the presentation
    contexts and role selections: UIDs only). A requestor that proposes the same contexts
    each time it connects (a modality, a storescu with over a hundred of them) is
    answered without going through its contexts again. Bounded: it starts afresh when
    full."""

    LIMIT = 64

    def __init__(self) -> None:
        self._known: BoundedMemo[_Answers] = BoundedMemo(self.LIMIT)
        # The same by the tuples' identity: the Upper Layer gives equal proposals as the
        # same tuples, and hashing a hundred contexts is skipped.
        self._same: IdentityMemo[_Answers] = IdentityMemo(self.LIMIT)

    def answer(
        self,
        proposed: tuple[PresentationContextRQ, ...],
        roles: tuple[RoleSelection, ...],
        supported: dict[str, PresentationContext],
    ) -> _Answers:
        answers = self._same.get(proposed, roles)
        if answers is None:
            answers = self._known.get((proposed, roles))
            if answers is None:
                answers = self._known.put(
                    (proposed, roles), _answer_contexts(proposed, roles, supported)
                )
            self._same.put((proposed, roles), answers)
        return answers


def _answer_contexts(
    proposed: tuple[PresentationContextRQ, ...],
    roles: tuple[RoleSelection, ...],
    supported: dict[str, PresentationContext],
) -> _Answers:
    asked_roles = {role.sop_class_uid: role for role in roles}
    results: list[PresentationContextAC] = []
    accepted: dict[int, AcceptedContext] = {}
    granted_roles: dict[str, RoleSelection] = {}
    for rq in proposed:
        ours = supported.get(rq.abstract_syntax)
        if ours is None:
            results.append(
                PresentationContextAC(
                    rq.context_id,
                    PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                    rq.transfer_syntaxes[0],
                )
            )
            continue
        chosen = next((ts for ts in rq.transfer_syntaxes if ts in ours.transfer_syntaxes), None)
        if chosen is None:
            results.append(
                PresentationContextAC(
                    rq.context_id,
                    PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                    rq.transfer_syntaxes[0],
                )
            )
            continue
        # Default roles: requestor SCU, acceptor SCP.
        their_scu, their_scp = True, False
        ask = asked_roles.get(rq.abstract_syntax)
        if ask is not None:
            their_scu = ask.scu_role and ours.scu_role is not False
            their_scp = ask.scp_role and bool(ours.scp_role)
            granted_roles[rq.abstract_syntax] = RoleSelection(
                rq.abstract_syntax, their_scu, their_scp
            )
        results.append(
            PresentationContextAC(rq.context_id, PresentationContextResult.ACCEPTANCE, chosen)
        )
        accepted[rq.context_id] = AcceptedContext(
            rq.context_id, rq.abstract_syntax, chosen, we_are_scu=their_scp, we_are_scp=their_scu
        )
    return tuple(results), accepted, tuple(granted_roles.values())
