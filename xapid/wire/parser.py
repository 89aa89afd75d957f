"""The request parser of the HTTP channel: the request line and headers, then the body
(``Content-Length``, or chunked through a state machine that touches each byte once), buffered
or handed to a streaming sink as it arrives (see :mod:`xapid.wire.http`)."""

from __future__ import annotations

import re

from xapid.wire.channel_state import _BODY, _CHUNK_DATA, _CHUNK_END, _CHUNK_SIZE, _DECIDE, _DONE, _TRAILERS, ChannelState
from xapid.wire.messages import HttpRequest

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_CHUNK_LINE_MAX = 1024  # a chunk-size line, extensions included
_TRAILERS_MAX = 8192
_STREAM_PIECE = 1 << 20  # decoded chunk data given to a sink in one write at most


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestParser(ChannelState):
    """The parsing part of :class:`~xapid.wire.http.HttpChannel`."""

    def _head(self, buf: bytearray) -> bool:
        """Parse the request line and headers once they have all arrived."""
        while self._blank < 2 and buf[:2] == b"\r\n":  # a blank line or two before a request (RFC 9112 §2.2)
            del buf[:2]
            self._blank += 1
        end = buf.find(b"\r\n\r\n", max(0, self._scan - 3))
        limit = self.settings.max_header
        if end < 0:
            self._scan = len(buf)
            if len(buf) > limit:
                line_end = buf.find(b"\r\n")
                first = bytes(buf[:line_end if 0 <= line_end < 256 else 256])
                if b" HTTP/1." not in first:
                    raise _Refused(400, "not an HTTP request")
                raise _Refused(431, "request headers too large")
            return False
        if end > limit:
            raise _Refused(431, "request headers too large")
        head = bytes(buf[:end])
        del buf[:end + 4]
        self._scan = 0
        self._blank = 0
        self._start(head)
        self._cancel_timer()
        return True

    def _start(self, head: bytes) -> None:
        bare = head.replace(b"\r\n", b"")
        if b"\n" in bare or b"\r" in bare:
            raise _Refused(400, "bare CR or LF in the request head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith(b"HTTP/"):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        headers: dict[bytes, bytes] = {}
        repeated: dict[bytes, list[bytes]] = {}  # joined once at the end: linear however many repeats
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise _Refused(400, "malformed header line")
            key = name.lower()
            value = value.strip(b" \t")
            first = headers.get(key)
            if first is None:
                headers[key] = value
            elif key == b"content-length":
                if first != value:
                    raise _Refused(400, "conflicting Content-Length headers")
            else:
                repeated.setdefault(key, [first]).append(value)
        for key, values in repeated.items():
            headers[key] = b", ".join(values)
        self._request = HttpRequest(method, target, version, headers, peer=self.peer, client=self.client)
        coding = headers.get(b"transfer-encoding")
        if coding is not None:
            if coding.lower() != b"chunked":
                raise _Refused(501, "only the chunked transfer coding is supported")
            if b"content-length" in headers:
                raise _Refused(400, "both Content-Length and Transfer-Encoding")
            self._framing = _CHUNK_SIZE
        else:
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or len(length) > 18:
                raise _Refused(400, "bad Content-Length")
            self._remaining = int(length)
            self._framing = _BODY if self._remaining else _DONE
        self._state = _DECIDE

    def _fixed(self, buf: bytearray) -> bool:
        """Take Content-Length body bytes from *buf*: buffered, or fed to the sink as they come."""
        if self._sink is not None:
            if not buf:
                return False
            taken = min(len(buf), self._remaining)
            if taken == len(buf):
                piece = bytes(buf)
                self._buf = bytearray()
            else:
                piece = bytes(buf[:taken])
                del buf[:taken]
            self._remaining -= taken
            if not self._remaining:
                self._state = _DONE
            self._feed(piece)
            return True
        if len(buf) < self._remaining:
            self._body += buf
            self._remaining -= len(buf)
            del buf[:]
            return False
        if self._body:
            self._body += buf[:self._remaining]
            body = bytes(self._body)
            self._body = bytearray()
        else:
            body = bytes(buf[:self._remaining])
        del buf[:self._remaining]
        self._remaining = 0
        self._state = _DONE
        assert self._request is not None
        self._request.body = body
        return True

    def _chunked(self, buf: bytearray) -> bool:
        """Decode chunked body data from *buf*; True once the last chunk and trailers arrived.
        With a sink, the data decoded from what has arrived goes to it in one write (however
        small the chunks); False also when the sink asked to wait."""
        done = self._dechunk(buf)
        if self._sink is not None and self._body and not self._closing:
            self._flush_chunks()
            if self._sink_wait is not None:
                return done  # True: the loop waits on the sink before finishing
        return done or self._state == _DONE

    def _flush_chunks(self) -> None:
        piece = bytes(self._body)
        self._body = bytearray()
        self._feed(piece)

    def _dechunk(self, buf: bytearray) -> bool:
        while True:
            if self._state == _DONE:  # the sink declared the body complete
                return True
            if self._state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", 0, _CHUNK_LINE_MAX + 2)
                if end < 0:
                    if len(buf) > _CHUNK_LINE_MAX:
                        raise _Refused(400, "bad chunk size line")
                    return False
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip(b" \t")
                if not _HEX.match(size_text):
                    raise _Refused(400, "bad chunk size")
                size = int(size_text, 16)
                del buf[:end + 2]
                if size == 0:
                    self._state = _TRAILERS
                    continue
                if self._sink is None and len(self._body) + size > self.settings.max_body:
                    raise _Refused(413, "request body is too large")
                self._remaining = size
                self._state = _CHUNK_DATA
            elif self._state == _CHUNK_DATA:
                if not buf:
                    return False
                taken = min(len(buf), self._remaining)
                if self._sink is not None:
                    self._body += buf[:taken]
                    del buf[:taken]
                    self._remaining -= taken
                    if not self._remaining:
                        self._state = _CHUNK_END
                    if len(self._body) >= _STREAM_PIECE:
                        self._flush_chunks()
                        if self._sink_wait is not None or self._closing:
                            return False
                    continue
                self._body += buf[:taken]
                del buf[:taken]
                self._remaining -= taken
                if self._remaining:
                    return False
                self._state = _CHUNK_END
            elif self._state == _CHUNK_END:
                if len(buf) < 2:
                    if bytes(buf[:1]) not in (b"", b"\r"):
                        raise _Refused(400, "chunk without CRLF")
                    return False
                if buf[:2] != b"\r\n":
                    raise _Refused(400, "chunk without CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS: header lines up to an empty line, ignored
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    assert self._request is not None
                    if self._sink is None:
                        self._request.body = bytes(self._body)
                        self._body = bytearray()
                    self._state = _DONE
                    return True
                end = buf.find(b"\r\n\r\n", 0, _TRAILERS_MAX)
                if end < 0:
                    if len(buf) > _TRAILERS_MAX:
                        raise _Refused(431, "trailers too large")
                    return False
                del buf[:end + 2]  # the trailer lines; the blank line ends the body next turn
