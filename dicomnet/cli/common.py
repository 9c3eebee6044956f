"""What the commands share: their common options, logging, the association they open,
and query keys from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NoReturn

from dicomnet.client import connect
from dicomnet.errors import DicomNetError
from dicomnet.identity import UserIdentity
from dicomnet.proto.contexts import PresentationContext

__all__ = [
    "Parser",
    "UsageError",
    "add_common",
    "add_identity",
    "add_query",
    "add_remote",
    "add_tls",
    "ae_title",
    "build_query",
    "configure_logging",
    "describe",
    "identity_from_args",
    "open_association",
    "prepare_tls",
    "qr_contexts",
    "query_level",
    "reason_for",
    "tls_listener_context",
]


class UsageError(Exception):
    """A command line that cannot be carried out as written (exit status 2)."""


def ae_title(text: str) -> str:
    """An AE title option's value: 1 to 16 characters, no backslash or control
    character (PS3.5 Table 6.2-1, AE)."""
    from dicomnet.storage import is_valid_ae_title

    if not 0 < len(text.strip()) <= 16 or not is_valid_ae_title(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an AE title (1 to 16 characters, no backslash or control character)"
        )
    return text


def transfer_syntax_arg(text: str) -> str:
    """A transfer syntax option's value: a UID or a name (`dicomnet.transcode`)."""
    from dicomnet.transcode import named_transfer_syntax

    try:
        return named_transfer_syntax(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_common(parser: argparse.ArgumentParser) -> None:
    # -aet / -aec: the spelling of DCMTK's tools, so that their command lines carry over.
    parser.add_argument(
        "--aet", "-aet", type=ae_title, default="DICOMNET", help="our AE title (default: DICOMNET)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log associations")
    parser.add_argument(
        "--debug", action="store_true", help="log association and DIMSE traffic in detail"
    )


def add_remote(parser: argparse.ArgumentParser, timeout_flag: str = "--timeout") -> None:
    parser.add_argument("host", help="the peer's host name or address")
    parser.add_argument("port", type=int, help="the peer's TCP port")
    parser.add_argument(
        "--aec",
        "-aec",
        type=ae_title,
        default="ANY-SCP",
        help="the peer's AE title (default: ANY-SCP)",
    )
    parser.add_argument(
        timeout_flag,
        dest="timeout",
        type=float,
        default=30.0,
        help="connect/ARTIM timeout, seconds (default 30)",
    )
    parser.add_argument(
        "--dimse-timeout", type=float, default=60.0, help="DIMSE response timeout (default 60)"
    )
    add_identity(parser)
    add_tls(parser)


def add_identity(parser: argparse.ArgumentParser) -> None:
    """The User Identity options of an SCU command (PS3.7 §D.3.3.7)."""
    group = parser.add_argument_group("user identity")
    group.add_argument("--user", metavar="NAME", help="send this user name (identity type 1)")
    group.add_argument(
        "--password",
        metavar="P",
        help="with --user: send user name and password (type 2); without it the "
        "DICOMNET_PASSWORD environment variable is used if set (not shown by ps)",
    )
    group.add_argument("--jwt", metavar="TOKEN", help="send a JSON Web Token (type 5)")
    group.add_argument(
        "--positive-response",
        action="store_true",
        help="ask the peer to confirm the identity, and fail if it does not",
    )


def identity_from_args(args: argparse.Namespace) -> UserIdentity | None:
    """The `UserIdentity` the command line asks for, or None."""
    user, jwt = getattr(args, "user", None), getattr(args, "jwt", None)
    password = getattr(args, "password", None)
    positive = bool(getattr(args, "positive_response", False))
    if user is not None and jwt is not None:
        raise UsageError("--user and --jwt are exclusive")
    if password is not None and user is None:
        raise UsageError("--password needs --user")
    if jwt is not None:
        return UserIdentity.jwt(jwt, positive_response=positive)
    if user is None:
        if positive:
            raise UsageError("--positive-response needs --user or --jwt")
        return None
    password = password if password is not None else os.environ.get("DICOMNET_PASSWORD")
    if password is not None:
        return UserIdentity.password(user, password, positive_response=positive)
    return UserIdentity.username(user, positive_response=positive)


def add_tls(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    """`--tls`, `--tls-ca`, `--tls-cert`, `--tls-key` (PS3.15 §B.9, BCP 195 profile)."""
    group = parser.add_argument_group("TLS (PS3.15 B.9, BCP 195: TLS 1.2+, AEAD suites)")
    if server:
        group.add_argument(
            "--tls",
            action="store_true",
            help="listen with TLS (needs --tls-cert and --tls-key; implied by them)",
        )
        group.add_argument("--tls-cert", metavar="F", help="our certificate (chain), PEM")
        group.add_argument(
            "--tls-key", metavar="F", help="our private key, PEM (default: in --tls-cert)"
        )
        group.add_argument(
            "--tls-ca",
            metavar="F",
            help="CA certificates (PEM): require client certificates issued by them; "
            "also what TLS peers' certificates are verified against",
        )
        return
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, verifying the peer's certificate (implied by the other "
        "--tls-* options)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="F",
        help="trust the CA certificates in F (PEM) for the peer's certificate "
        "(default: the system's trust store)",
    )
    group.add_argument(
        "--tls-cert", metavar="F", help="our client certificate (chain), PEM, if the peer asks"
    )
    group.add_argument(
        "--tls-key", metavar="F", help="the private key of --tls-cert, PEM (default: in it)"
    )


TLS_PEER = "tls://"  # `--peer AET=tls://HOST:PORT`: a peer reached over TLS


def _tls_failure(args: argparse.Namespace, message: str) -> SystemExit:
    print(f"dicomnet {args.command}: {message}", file=sys.stderr)
    return SystemExit(2)


def prepare_tls(args: argparse.Namespace) -> None:
    """Build the TLS contexts the command line asks for, once, before anything runs:
    `args.tls_context` (a client context, or None) and, for `serve`, also
    `args.tls_server_context`. A file that cannot be used ends the command (exit 2)."""
    from dicomnet.tls import TLSConfigError, client_context, server_context

    if not hasattr(args, "tls_ca"):
        return
    ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
    args.tls_context = None
    args.tls_server_context = None
    try:
        if args.command == "serve":
            if (args.tls or ca or key) and not cert:
                raise _tls_failure(args, "TLS needs --tls-cert (and --tls-key)")
            if cert:
                args.tls_server_context = server_context(cert, key, ca)
            if any(peer.partition("=")[2].startswith(TLS_PEER) for peer in args.peer):
                args.tls_context = client_context(ca, cert, key)
            return
        if args.tls or ca or cert or key:
            args.tls_context = client_context(ca, cert, key)
            if cert:  # a listener of ours (commit --listen-port) serves TLS too
                args.tls_server_context = server_context(cert, key, ca)
    except TLSConfigError as exc:
        raise _tls_failure(args, f"TLS: {exc}") from None


def tls_listener_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context for a listener of an SCU command (None: plain)."""
    context = getattr(args, "tls_server_context", None)
    return context if isinstance(context, ssl.SSLContext) else None


def add_query(
    parser: argparse.ArgumentParser, models: tuple[str, ...] = ("patient", "study", "mwl")
) -> None:
    parser.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="a query key: a keyword or gggg,eeee, with an optional value (repeatable); "
        "nested: SequenceKeyword[0].Keyword=VALUE",
    )
    parser.add_argument(
        "--model", choices=models, default="study", help="information model (default study)"
    )
    parser.add_argument(
        "--level",
        type=str.upper,
        choices=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        help="Query/Retrieve Level (default: the model's top level)",
    )


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.INFO
    if getattr(args, "debug", False):
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if level > logging.DEBUG:
        # pydicom's remarks on the files it reads ("Expected explicit VR, but found
        # implicit VR", each as a log line and a warning) are for --debug; what a
        # command cannot do with a file, it says itself.
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="pydicom")
    else:
        # pydicom says most of its remarks twice, as a log line and as a warning, and
        # again each time it reads a file (store reads each twice): each is said once,
        # as a log line (as Python shows a warning once per place in the code).
        logging.captureWarnings(True)
        captured = logging.getLogger("py.warnings")
        if not any(isinstance(f, _SaidOnce) for f in captured.filters):
            captured.addFilter(_SaidOnce())


class _SaidOnce(logging.Filter):
    """Lets each of pydicom's remarks through once: a log line that repeats one, or a
    captured warning that repeats a log line, is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()
        logging.getLogger("pydicom").addFilter(self._first_time)

    def _first_time(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.said:
            return False
        self.said.add(text)
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        text = str(args[0]) if isinstance(args, tuple) and args else record.getMessage()
        return not any(said in text for said in self.said)


def reason_for(path: object, exc: BaseException) -> str:
    """Why a file cannot be used, without its path when the message starts with it
    (``skipping a.txt: not DICOM``, not ``skipping a.txt: a.txt is not DICOM``)."""
    text = str(exc)
    name = str(path)
    if text.startswith(name + " "):
        text = text[len(name) + 1 :]
        if text.startswith("is "):
            text = text[3:]
    return text


@asynccontextmanager
async def open_association(
    args: argparse.Namespace, contexts: Sequence[PresentationContext]
) -> AsyncIterator[Any]:
    """`connect()` with the command line's peer, titles, timeouts and user identity."""
    identity = identity_from_args(args)
    async with connect(
        args.host,
        args.port,
        aet=args.aet,
        aec=args.aec,
        contexts=contexts,
        connect_timeout=args.timeout,
        artim_timeout=args.timeout,
        dimse_timeout=args.dimse_timeout,
        user_identity=identity,
        tls=getattr(args, "tls_context", None),
    ) as association:
        if identity is not None and identity.positive_response:
            if association.user_identity_response is None:
                raise DicomNetError("the peer did not confirm the user identity")
        yield association


def _tag(text: str) -> int:
    """A keyword or `gggg,eeee` (parentheses optional) as a tag."""
    from pydicom.datadict import tag_for_keyword

    raw = text.strip().strip("()")
    if "," in raw:
        group, element = raw.split(",", 1)
        try:
            return (int(group, 16) << 16) | int(element, 16)
        except ValueError:
            raise UsageError(f"{text!r} is not a tag (gggg,eeee)") from None
    tag = tag_for_keyword(raw)
    if tag is None:
        raise UsageError(f"{text!r} is not a DICOM keyword")
    return int(tag)


def _set_key(dataset: Any, path: str, value: str | None) -> None:
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset

    head, _, rest = path.partition(".")
    index = None
    if head.endswith("]") and "[" in head:
        head, _, number = head[:-1].partition("[")
        index = int(number)
    tag = _tag(head)
    if rest or index is not None:
        if tag not in dataset:
            dataset.add_new(tag, "SQ", [])
        items = dataset[tag].value
        position = index or 0
        while len(items) <= position:
            items.append(Dataset())
        if rest:
            _set_key(items[position], rest, value)
        return
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "LO"
    if vr == "SQ":
        dataset.add_new(tag, vr, [])
    else:
        dataset.add_new(tag, vr, value or None)


@contextmanager
def _quiet_values() -> Iterator[None]:
    """pydicom's warnings about query values its VR would not allow in a stored data set
    (a range, a wildcard) silenced: a value it cannot take at all still raises."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def build_query(keys: Sequence[str]) -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    for key in keys:
        name, has_value, value = key.partition("=")
        try:
            with _quiet_values():
                _set_key(query, name, value if has_value else None)
        except UsageError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            hint = ""
            if any(c in value for c in "*?"):
                hint = " (* and ? match text values only, PS3.4 C.2.2.2.4)"
            raise UsageError(f"-k {key}: {exc}{hint}") from None
    return query


_TOP_LEVEL = {"patient": "PATIENT", "study": "STUDY"}


def query_level(args: argparse.Namespace) -> str | None:
    if args.level == "PATIENT" and args.model == "study":
        raise UsageError(
            "--level PATIENT is not a level of the study model (PS3.4 C.6.2): use --model patient"
        )
    if args.level:
        return str(args.level)
    return _TOP_LEVEL.get(args.model)


def describe(dataset: Any) -> str:
    parts = []
    for element in dataset:
        if element.VR == "SQ":
            parts.append(f"{element.keyword or element.tag}=[{len(element.value)} item(s)]")
        else:
            parts.append(f"{element.keyword or element.tag}={element.value}")
    return "  ".join(parts)


def qr_contexts(kind: str, model: str) -> list[PresentationContext]:
    from dicomnet.services.qr import FIND_MODELS, GET_MODELS, MOVE_MODELS

    table = {"find": FIND_MODELS, "move": MOVE_MODELS, "get": GET_MODELS}[kind]
    return [PresentationContext(table[model])]
