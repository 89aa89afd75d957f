"""The state every part of an HTTP connection (:class:`xapid.wire.http.HttpChannel`) shares: the
parser's states and the channel's fields, set in one place, so that the request parser
(:mod:`xapid.wire.parser`) and the streaming paths (:mod:`xapid.wire.streams`) can be written as
parts of the one channel class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from xapid.wire.messages import BodySink, Client, Handler, HttpRequest, HttpResponse, HttpSettings

if TYPE_CHECKING:
    from xapid.wire.streams import BodyWriter

log = Logger()

_NOTHING = object()

# parser states
_HEAD, _DECIDE, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(8)


class ChannelState(Protocol):
    """The fields of one connection; the methods each part calls on another are declared here for
    the type checker (they are defined by :class:`~xapid.wire.http.HttpChannel`'s parts)."""

    def __init__(self, handler: Handler, settings: HttpSettings, clock: Any, admission: Any = None):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.admission = admission
        self.client = Client("")
        self.peer = ""
        self._sink_for: Callable[[HttpRequest], Any] | None = getattr(handler, "sink_for", None)
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the headers resumes
        self._blank = 0  # blank lines skipped before the current request
        self._state = _HEAD
        self._framing = _DONE  # the body's first state (_BODY, _CHUNK_SIZE, or _DONE: no body)
        self._request: HttpRequest | None = None  # headers parsed, body pending
        self._body = bytearray()
        self._remaining = 0  # body or chunk bytes still to come
        self._pending: Deferred[Any] | None = None  # a reply (or a sink_for decision) being computed
        self._held: Deferred[Any] | None = None  # the reply answered now may hold its follow-up (a fan-out)
        self._expressed: HttpResponse | None = None  # a reply sent ahead of its callbacks (fanout.Wait)
        self._parked_version = b""  # the HTTP version and keep-alive of the request waiting on a fanout.Wait
        self._parked_keep = False
        self._sink: BodySink | None = None  # where the current request's body is streamed
        self._sink_wait: Deferred[Any] | None = None  # the sink's write that reading waits on
        self._writer: BodyWriter | None = None  # a streamed reply in progress
        self._stream_keep = False
        self._takeover: IProtocol | None = None  # the protocol the connection was handed to
        self._early = False  # an early reply head was sent: nothing else is ever answered here
        self._ended = False  # an early reply's request is over: the input is only drained
        self._drain_left = 0  # bytes still discarded before closing, while _ended
        self._processing = False
        self._closing = False
        self._write_paused = False  # the transport's buffer is full: the client is not reading
        self._read_paused = False
        self._direct = True  # nothing of ours is queued in the transport: replies may go straight out
        self._direct_ok = False  # the current body may still go to its sink's read_direct (once some arrived)
        self._timer: Any = None
        self._timer_kind = ""
        self._authenticated = False
        self._inline = False
        self._outcome: Any = _NOTHING
        self._producing = False
        self.connected_at = 0.0

    @property
    def _io(self) -> Any:
        """The connection's transport, set from connectionMade on: TCP, TLS or UNIX, with the producer
        and abortConnection methods that Protocol's ``ITransport | None`` does not declare."""
        return self.transport

    def _mark_authenticated(self) -> None:
        """Tell the admission (once) that this connection is authenticated."""
        if not self._authenticated:
            self._authenticated = True
            if self.admission is not None:
                self.admission.authenticated(self)

    if TYPE_CHECKING:  # defined by HttpChannel (xapid.wire.http)
        def _deadline(self, kind: str, seconds: float) -> None: ...
        def _cancel_timer(self) -> None: ...
        def _pause_reading(self) -> None: ...
        def _process(self) -> None: ...
        def _settle(self, d: Deferred[Any], then: Callable[[Any], None]) -> None: ...
        def _reply(self, request: HttpRequest, outcome: Any, close: bool = False) -> None: ...
        def _after_reply(self, keep: bool) -> None: ...
        def _head_bytes(self, version: bytes, response: HttpResponse, length: int | None, keep: bool,
                        takeover: bool = False) -> bytes: ...
        def _send(self, data: bytes, body: bytes = b"") -> None: ...
        def _refuse(self, status: int, reason_text: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None: ...
        def _abort_connection(self) -> None: ...
        def _close(self) -> None: ...

        # defined by StreamingChannel (xapid.wire.streams)
        def _feed(self, piece: bytes) -> None: ...
