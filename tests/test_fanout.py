"""One change waking many ``event.from`` watchers: every reply leaves before any connection's follow-up.

The watchers are real HTTP channels of the API's own handler (StringTransport below them); a
shared log of writes shows the order in which replies left.
"""

from __future__ import annotations

import json
import xmlrpc.client

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from support import ApiEnv
from xapid import fanout
from xapid.apitypes import Limits
from xapid.wire.http import HttpResponse, HttpSettings
from xapid.wire.resource import ApiHandler, make_factory

ORIGIN = b"https://console.example"


class LoggedTransport(StringTransport):
    """Appends (its name, what was written) to a log shared by every watcher."""

    def __init__(self, name: int, log: list[tuple[int, bytes]]):
        super().__init__()
        self.name, self.log = name, log

    def write(self, data: bytes) -> None:
        super().write(data)
        self.log.append((self.name, bytes(data)))


def answers(log: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The log as whole replies (a head and its body are two writes), in the order they left."""
    merged: list[tuple[int, bytes]] = []
    for name, data in log:
        if merged and merged[-1][0] == name and not data.startswith(b"HTTP/1.1 "):
            merged[-1] = (name, merged[-1][1] + data)
        else:
            merged.append((name, data))
    return merged


def post(body: bytes, origin: bytes | None = None, path: bytes = b"/", version: bytes = b"HTTP/1.1",
         extra: bytes = b"") -> bytes:
    if origin:
        extra += b"Origin: %s\r\n" % origin
    return b"POST %s %s\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n%s" % (path, version, extra, len(body), body)


@pytest.fixture
def env(tmp_path):
    return ApiEnv(tmp_path, Clock())


def watchers(env, count, origins=()):
    """*count* channels parked on event.from (the first ones with an Origin of *origins*), each with a
    pipelined ``host.get_all`` right behind; the shared write log; the session; a VM."""
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    factory = make_factory(ApiHandler(env.dispatcher, Limits(), cors_origins=(ORIGIN.decode(),)),
                           HttpSettings(), env.clock)
    log: list[tuple[int, bytes]] = []
    channels = []
    for index in range(count):
        channel = factory.buildProtocol(None)
        channel.makeConnection(LoggedTransport(index, log))
        origin = origins[index] if index < len(origins) else None
        wait = xmlrpc.client.dumps((client.session, ["vm"], token, 30.0), "event.from").encode()
        after = xmlrpc.client.dumps((client.session,), "host.get_all").encode()
        channel.dataReceived(post(wait, origin) + post(after))
        channels.append(channel)
    assert env.api.events.watchers == count and not log
    return channels, log, client, vm


def test_every_reply_of_a_wake_leaves_before_any_pipelined_answer(env):
    channels, log, client, vm = watchers(env, 5)
    client("VM.set_name_label", vm, "renamed")
    env.clock.advance(0)
    replies = [(name, data) for name, data in answers(log) if data.startswith(b"HTTP/1.1 200")]
    assert [name for name, _ in replies[:5]] == [0, 1, 2, 3, 4]
    assert [b"renamed" in data for _, data in replies[:5]] == [True] * 5, replies  # the event.from replies
    assert [name for name, _ in replies[5:]] == [0, 1, 2, 3, 4]  # then each one's next request
    assert all(b"renamed" not in data and b"OpaqueRef:" in data for _, data in replies[5:])
    for channel in channels:  # each connection went on as usual: waiting for its next request
        assert channel._pending is None and channel._timer_kind == "idle"
    assert fanout.active() is False


def test_a_shared_reply_carries_cors_headers_only_where_asked(env):
    """Watchers share one encoded reply; the CORS header goes to the one whose request had an Origin."""
    channels, log, client, vm = watchers(env, 3, origins=(None, ORIGIN))
    client("VM.set_name_label", vm, "shared")
    env.clock.advance(0)
    first = {name: data for name, data in answers(log) if b"shared" in data}
    assert b"Access-Control-Allow-Origin: " + ORIGIN in first[1]
    assert b"Access-Control-Allow-Origin" not in first[0] and b"Access-Control-Allow-Origin" not in first[2]
    assert first[0].replace(b"Date", b"") == first[2].replace(b"Date", b"")


def test_a_watcher_gone_during_the_wake_leaves_the_others_served(env):
    channels, log, client, vm = watchers(env, 3)
    client("VM.set_name_label", vm, "gone")
    real = channels[1]._release

    def lost_then_release(keep):  # the connection drops between its reply and its follow-up
        channels[1].connectionLost(None)
        real(keep)

    channels[1]._release = lost_then_release
    env.clock.advance(0)
    answered = [name for name, data in answers(log) if data.startswith(b"HTTP/1.1 200")]
    assert sorted(answered) == [0, 0, 1, 2, 2]  # 1 got its event reply, never its pipelined answer


def test_follow_ups_run_when_the_fan_out_ends_in_order():
    ran = []
    assert fanout.later(ran.append, "outside") is False and ran == []
    with fanout.sending():
        assert fanout.later(ran.append, 1)
        with fanout.sending():  # nested: joins the outer one
            assert fanout.later(ran.append, 2)
        assert ran == [] and fanout.active()
    assert ran == [1, 2] and not fanout.active()


def test_a_failing_follow_up_does_not_strand_the_others():
    ran = []

    def broken():
        raise RuntimeError("bug")

    with fanout.sending():
        fanout.later(broken)
        fanout.later(ran.append, "after")
    assert ran == ["after"]


def test_watchers_in_step_are_checked_and_answered_as_a_group(env):
    """Watchers in step (same classes, same token) are checked together: a VM change with 300
    watchers on messages and one on VMs looks twice, answers the VM watcher, leaves the others parked
    (scale.py measures that such a change costs the same with 1 000 watchers parked as with none)."""
    client = env.login()
    vm = client("VM.get_all")[0]
    hub = env.api.events
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    quiet = [env.dispatcher.call("event.from", [client.session, ["message"], token, 30.0]) for _ in range(300)]
    watching = env.dispatcher.call("event.from", [client.session, ["VM"], token, 30.0])
    looked = []
    real = hub.collect
    hub.collect = lambda subscription, since: looked.append(since) or real(subscription, since)
    client("VM.set_name_label", vm, "seen")
    env.clock.advance(0)
    assert len(looked) == 2
    assert watching.called and not any(d.called for d in quiet) and hub.watchers == 300
    (event,) = watching.result.value["events"]
    assert event["ref"] == vm and event["operation"] == "mod"
    env.clock.advance(31)  # the quiet ones time out together, with no events
    assert all(d.called and d.result.value["events"] == [] for d in quiet) and hub.watchers == 0


# -- the express lane: replies written before any watcher's callbacks run --------------------------


def test_every_reply_of_a_wake_is_written_before_any_connection_answers_in_python(env):
    """The first watcher's own answering (its callback chain reaching the connection) finds every
    watcher's reply already written: the last one waited for the sends before it, not for the Python
    of each reply before it as well."""
    channels, log, client, vm = watchers(env, 5)
    seen = []
    real = channels[0]._reply

    def reply(request, outcome, close=False):
        seen.append(sum(1 for _, data in answers(log) if b"renamed" in data))
        real(request, outcome, close)

    channels[0]._reply = reply
    client("VM.set_name_label", vm, "renamed")
    env.clock.advance(0)
    assert seen[0] == 5  # (then its pipelined request's answer)
    replies = [(name, data) for name, data in answers(log) if data.startswith(b"HTTP/1.1 200")]
    assert [name for name, data in replies if b"renamed" in data] == [0, 1, 2, 3, 4]  # each exactly once
    assert [name for name, data in replies[5:]] == [0, 1, 2, 3, 4]  # then the pipelined answers
    for channel in channels:
        assert channel._pending is None and channel._timer_kind == "idle" and channel._expressed is None and channel._parked_version == b"HTTP/1.1"


def test_json_rpc_and_http_1_0_watchers_get_their_own_reply_from_the_express_lane(env):
    """A JSON-RPC watcher's reply carries its own id; an HTTP/1.0 keep-alive watcher's head says
    keep-alive; an XML-RPC one gets the shared body.  Each gets exactly one reply, then the answer to
    the request it pipelined."""
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    factory = make_factory(ApiHandler(env.dispatcher, Limits()), HttpSettings(), env.clock)
    log: list[tuple[int, bytes]] = []
    after = post(xmlrpc.client.dumps((client.session,), "host.get_all").encode())
    requests = [
        post(json.dumps({"jsonrpc": "2.0", "method": "event.from", "id": "watch-7",
                         "params": [client.session, ["vm"], token, 30.0]}).encode(), path=b"/jsonrpc"),
        post(xmlrpc.client.dumps((client.session, ["vm"], token, 30.0), "event.from").encode(),
             version=b"HTTP/1.0", extra=b"Connection: keep-alive\r\n"),
        post(xmlrpc.client.dumps((client.session, ["vm"], token, 30.0), "event.from").encode()),
    ]
    channels = []
    for index, request in enumerate(requests):
        channel = factory.buildProtocol(None)
        channel.makeConnection(LoggedTransport(index, log))
        channel.dataReceived(request + after)
        channels.append(channel)
    client("VM.set_name_label", vm, "expressed")
    env.clock.advance(0)
    written = {index: b"".join(data for name, data in log if name == index) for index in range(3)}
    head, _, rest = written[0].partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    reply = json.loads(rest[:length])
    assert reply["id"] == "watch-7" and reply["result"]["events"][0]["snapshot"]["name_label"] == "expressed"
    assert rest[length:].startswith(b"HTTP/1.1 200 OK")  # the pipelined answer, after
    assert written[1].startswith(b"HTTP/1.0 200 OK") and b"Connection: keep-alive" in written[1].split(b"\r\n\r\n")[0]
    for index in (1, 2):
        head, _, rest = written[index].partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        (value,), _ = xmlrpc.client.loads(rest[:length])
        assert value["Value"]["events"][0]["snapshot"]["name_label"] == "expressed"
        assert rest[length:].count(b" 200 OK\r\n") == 1  # exactly one more reply: host.get_all's
    assert written[1].split(b"\r\n\r\n", 1)[1] == written[2].split(b"\r\n\r\n", 1)[1]  # one shared body
    assert all(not channel.transport.disconnecting for channel in channels)


class Rewriting(ApiHandler):
    """The API's handler with a layer that breaks the express lane's contract: it replaces the
    reply of every wait after the lane may have sent it."""

    def __call__(self, request):
        result = super().__call__(request)
        if isinstance(result, fanout.Wait):
            result.addCallback(lambda _: HttpResponse(200, b"rewritten", []))
        return result


def parked_behind_a_rewriter(env, transport):
    """A channel of :class:`Rewriting` over *transport*, parked on event.from; its client and a VM."""
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    channel = make_factory(Rewriting(env.dispatcher, Limits()), HttpSettings(), env.clock).buildProtocol(None)
    channel.makeConnection(transport)
    channel.dataReceived(post(xmlrpc.client.dumps((client.session, ["vm"], token, 30.0), "event.from").encode()))
    return channel, client, vm


def test_a_reply_changed_after_the_express_lane_sent_it_closes_the_connection(env, logged):
    """A layer that changes the reply after the express lane wrote the original breaks the lane's
    contract: the client has the original and the connection is closed, never a second reply."""

    log: list[tuple[int, bytes]] = []
    channel, client, vm = parked_behind_a_rewriter(env, LoggedTransport(0, log))
    client("VM.set_name_label", vm, "original")
    env.clock.advance(0)
    written = b"".join(data for _, data in log)
    assert written.count(b"HTTP/1.1 200 OK") == 1 and b"original" in written and b"rewritten" not in written
    assert channel._closing and channel.transport.disconnecting
    assert any("changed after it was sent" in event.get("log_format", "") for event in logged)


class Recorder:
    """A connection's end of the express lane, replaced by *send* (reply -> sent)."""

    def __init__(self, send):
        self.send = send

    def send_early(self, wait, reply):
        return self.send(reply)


@pytest.fixture
def logged():
    """The log events emitted during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_the_hub_sends_every_lane_before_any_callback(env):
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    order = []
    waits = [env.dispatcher.call("event.from", [client.session, ["vm"], token, 30.0]) for _ in range(3)]
    for index, wait in enumerate(waits):
        assert isinstance(wait, fanout.Wait)
        wait.encode = lambda value: value
        wait.sender = Recorder(lambda value, index=index: order.append(("sent", index)) or True)
        wait.addCallback(lambda value, index=index: order.append(("fired", index)))
    waits[1].sender = None  # no lane: answered by its callbacks alone
    client("VM.set_name_label", vm, "lanes")
    env.clock.advance(0)
    assert order == [("sent", 0), ("sent", 2), ("fired", 0), ("fired", 1), ("fired", 2)]


def test_a_failing_lane_is_logged_and_its_watcher_answered_by_the_callbacks(env, logged):
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    broken, fine = (env.dispatcher.call("event.from", [client.session, ["vm"], token, 30.0]) for _ in range(2))
    sent = []

    def explode(value):
        raise RuntimeError("bug in an encoder")

    broken.encode, broken.sender = explode, Recorder(sent.append)
    fine.encode, fine.sender = (lambda value: "reply"), Recorder(lambda reply: sent.append(reply) or True)
    client("VM.set_name_label", vm, "failing")
    env.clock.advance(0)
    assert sent == ["reply"]
    assert broken.called and broken.result.value["events"][0]["ref"] == vm
    assert fine.called
    failures = [event["log_failure"] for event in logged if "log_failure" in event]
    assert [str(failure.value) for failure in failures] == ["bug in an encoder"]


def test_no_express_lane_without_both_ends_or_once_fired():
    wait = fanout.Wait()
    assert wait.express("v") is False  # nobody encodes nor sends
    wait.encode = lambda value: value
    assert wait.express("v") is False  # nobody sends
    sent = []
    wait.sender = Recorder(lambda reply: sent.append(reply) or True)
    wait.callback("done")
    assert wait.express("v") is False and sent == []  # fired already


class Queued(StringTransport):
    """A transport whose socket is full: what is written stays queued here until the connection is
    closed; an abort drops the queue (as Twisted's does), closing flushes it."""

    def abortConnection(self):
        self.io.seek(0)
        self.io.truncate()
        super().abortConnection()


def test_a_reply_changed_after_the_lane_still_leaves_whole_when_it_was_queued(env):
    """The reply the lane sent was still queued (the client's socket full) when the contract broke:
    closing sends it, whole; it is not thrown away with the connection."""

    channel, client, vm = parked_behind_a_rewriter(env, Queued())
    client("VM.set_name_label", vm, "queued")
    env.clock.advance(0)
    written = channel.transport.value()
    assert written.count(b"HTTP/1.1 200 OK") == 1 and b"queued" in written and b"rewritten" not in written
    assert channel.transport.disconnecting


def test_a_watcher_cancelled_during_the_sends_leaves_the_others_answered(env):
    """Replies now leave before the hub's bookkeeping: a waiter dropped meanwhile (its connection
    gone) is skipped there, and every other waiter is still answered and unregistered."""
    client = env.login()
    vm = client("VM.get_all")[0]
    token = env.raw("event.from", [client.session, ["vm"], "", 0.0])["token"]
    waits = [env.dispatcher.call("event.from", [client.session, ["vm"], token, 30.0]) for _ in range(3)]
    for wait in waits:
        wait.addErrback(lambda failure: None)  # the cancelled one
    waits[0].encode = lambda value: value
    waits[0].sender = Recorder(lambda reply: waits[1].cancel() or True)
    client("VM.set_name_label", vm, "cancelled")
    env.clock.advance(0)
    assert all(wait.called for wait in waits) and env.api.events.watchers == 0
    for wait in (waits[0], waits[2]):
        assert [event["ref"] for event in wait.result.value["events"]] == [vm]
    assert waits[1].result is None  # its cancellation, handled above


def test_a_reply_that_cannot_be_encoded_is_an_internal_error_to_each_watcher(env, logged, monkeypatch):
    """The lane gives way to the ordinary path, which answers INTERNAL_ERROR and logs it once per watcher."""
    from xapid.apitypes import SharedValue
    from xapid.wire import resource

    channels, log, client, vm = watchers(env, 2)
    real = resource.xmlrpc.success

    def success(value):
        if isinstance(value, SharedValue):
            raise ValueError("cannot encode this")
        return real(value)

    monkeypatch.setattr(resource.xmlrpc, "success", success)
    client("VM.set_name_label", vm, "unencodable")
    env.clock.advance(0)
    replies = [(name, data) for name, data in answers(log) if data.startswith(b"HTTP/1.1 200")]
    assert [name for name, data in replies[:2]] == [0, 1]
    for _, data in replies[:2]:
        (fault,) = [data.split(b"\r\n\r\n", 1)[1]]
        assert b"INTERNAL_ERROR" in fault and b"unencodable" not in fault
    failures = [event for event in logged if "log_failure" in event]
    assert len(failures) == 2 and all(str(event["log_failure"].value) == "cannot encode this" for event in failures)
