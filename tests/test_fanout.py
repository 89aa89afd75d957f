"""One change waking many ``event.from`` watchers: every reply leaves before any connection's follow-up.

The watchers are real HTTP channels of the API's own handler (StringTransport below them); a
shared log of writes shows the order in which replies left.
"""

from __future__ import annotations

import xmlrpc.client

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from support import ApiEnv
from xapid import fanout
from xapid.apitypes import Limits
from xapid.wire.http import HttpSettings
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


def post(body: bytes, origin: bytes | None = None) -> bytes:
    extra = b"Origin: %s\r\n" % origin if origin else b""
    return b"POST / HTTP/1.1\r\nHost: h\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


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
