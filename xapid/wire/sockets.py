"""Socket-level helpers of the HTTP channel: the peer's credentials on a UNIX socket, writing
straight to a socket, and widening a connection's send buffer for large replies."""

from __future__ import annotations

import socket
import struct
from typing import Any, TypeGuard

from twisted.internet.abstract import FileDescriptor

LARGE_REPLY = 256 << 10  # a reply body from this size on widens its connection's socket buffer (_widen)
LARGE_SNDBUF = 4 << 20  # SO_SNDBUF asked for then (the kernel doubles it, capped by net.core.wmem_max)
LARGE_SEND_LIMIT = 1 << 20  # bytes Twisted sends per reactor turn on such a connection (its default 128 KiB)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(transport: Any) -> int | None:
    """The user id of the process at the other end of *transport* when it is a UNIX socket
    (``SO_PEERCRED``: the credentials the kernel recorded at connect, which the peer cannot
    forge); None for any other transport or when the kernel does not say."""
    try:
        sock = transport.getHandle()
        if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
            return None
        _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (AttributeError, OSError, struct.error):
        return None
    return int(uid)


def write_now(transport: Any, data: bytes, more: bytes = b"") -> int:
    """Write as much of *data* (then *more*) as the socket takes right now, bypassing the
    reactor's queue; returns how many bytes went out (0 when this transport cannot write directly).

    The reactor normally queues a write and sends it on its next turn, after it has read
    more input.  When many deferred replies are answered at once (1 000 ``event.from``
    watchers woken by one change) that makes each watcher wait for every other socket's
    input to be read first.  Sending at once fixes that.  This is only valid on a plain
    socket transport (TCP, UNIX) that is connected and has nothing queued: the caller must
    queue the rest (and everything after it) through ``transport.write`` so that nothing
    overtakes queued data (:meth:`HttpChannel._send` does).  TLS transports carry ciphertext on their socket and are never
    written this way.  *data* and *more* go out in one ``sendmsg`` (a reply's head and body,
    never concatenated), uncapped (Twisted's own writes send 128 KiB per reactor turn).
    This module is the one place that reaches below Twisted's transport API.
    """
    if not open_plain(transport):
        return 0
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        sent = transport.writeSomeData(data)
        return sent if isinstance(sent, int) and sent > 0 else 0
    try:
        return sock.sendmsg([data, more]) if more else sock.send(data)
    except OSError:  # EAGAIN: all is queued; a broken socket: Twisted's write finds out and closes
        return 0


def open_plain(transport: Any) -> TypeGuard[FileDescriptor]:
    """*transport* is a connected, not closing, plain (not TLS) descriptor transport: its socket
    carries the bytes the protocol writes, so they may be written or read beside Twisted."""
    return (isinstance(transport, FileDescriptor) and not getattr(transport, "TLS", False)
            and bool(transport.connected) and not transport.disconnecting)


def plain_socket(transport: Any) -> socket.socket | None:
    """The socket of an :func:`open_plain` TCP or UNIX transport, else None."""
    sock = getattr(transport, "socket", None) if open_plain(transport) else None
    return sock if isinstance(sock, socket.socket) else None


def _widen(transport: Any) -> None:
    """Ready a plain socket transport for large replies: a send buffer of :data:`LARGE_SNDBUF`
    (so a reply of several MB leaves in one ``sendmsg`` while the client reads) and
    Twisted's per-turn send limit raised to :data:`LARGE_SEND_LIMIT` for whatever is queued."""
    if getattr(transport, "_xapid_wide", False) or getattr(transport, "TLS", False):
        return
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        return
    try:
        transport._xapid_wide = True
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * LARGE_SNDBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LARGE_SNDBUF)
        transport.SEND_LIMIT = max(getattr(transport, "SEND_LIMIT", 0), LARGE_SEND_LIMIT)
    except (OSError, AttributeError):
        pass
