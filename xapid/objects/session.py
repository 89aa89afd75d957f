"""``session.*``: password login against the users file (see :mod:`xapid.auth.login`), logout.

**Local superuser** (xapi's ``is_local_superuser``): a peer whose kernel credentials
(``SO_PEERCRED``, read by :mod:`xapid.wire.http`) are uid 0 on a UNIX-socket listener logs in
with any user name and password, empty ones included, as xapi trusts ``/var/lib/xcp/xapi``.
This is checked before the password checker, so it is never throttled and costs no bcrypt.  The
session has role pool-admin, ``is_local_superuser`` true, no ``rbac_permissions`` and no user
object, and ``auth_user_name`` is the name given.  Over TCP (and for other uids) the login is an
ordinary one.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.logger import Logger

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import message

log = Logger()

LOCAL_SUPERUSER = "(local superuser)"  # the sessions' user: no users-file name can be this
SUPERUSER_ROLE = "pool-admin"


def user_object(store: Any, name: str) -> str:
    """The ``user`` object mirroring a users-file entry; ref and uuid derive from the name, so
    they stay the same across restarts although user objects are not stored."""
    uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"xapid-user:{name}"))
    ref = f"OpaqueRef:{uuid}"
    if store.find(ref) is None:
        store.add("user", {"uuid": uuid, "short_name": name, "fullname": name}, ref=ref)
    return ref


async def _login(ctx: CallContext, uname: str, pwd: str, originator: str) -> str:
    """Check the password through the API's PasswordChecker (its own pool, per-source limits);
    every kind of refusal gets the same error after the same delay."""
    client = ctx.client
    if client is not None and getattr(client, "uid", None) == 0:
        return _local_superuser(ctx, uname, originator)
    outcome = await ctx.api.passwords.check(client.address if client is not None else "", uname, pwd)
    user = outcome.user
    if user is None:
        if outcome.checked:  # throttled and refused tries are not logged one by one
            log.warn("failed login for {user!r} by {originator!r} from {source}", user=uname,
                     originator=originator, source=outcome.source)
        await ctx.api.sleep(ctx.api.auth_failure_delay)
        raise XenAPIError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
    if client is not None:
        client.authenticated = True
    session = ctx.api.sessions.create(user.name, user.role, originator, ctx.api.host_ref, user_object(ctx.store, user.name))
    return session.ref


def _local_superuser(ctx: CallContext, uname: str, originator: str) -> str:
    ctx.client.authenticated = True
    session = ctx.api.sessions.create(LOCAL_SUPERUSER, SUPERUSER_ROLE, originator, ctx.api.host_ref, "OpaqueRef:NULL",
                                      local_superuser=True, auth_user_name=uname)
    log.info("local superuser login (uid 0 on a UNIX socket) as {user!r} by {originator!r}", user=uname,
             originator=originator)
    return session.ref


@message("session.login_with_password")
async def login_with_password(ctx: CallContext, uname: str, pwd: str, version: str, originator: str) -> str:
    """A session for a user of the users file; the same failure for any bad credential."""
    return await _login(ctx, uname, pwd, originator)


@message("session.slave_local_login_with_password")
async def slave_local_login_with_password(ctx: CallContext, uname: str, pwd: str) -> str:
    """On a single host this is an ordinary login."""
    return await _login(ctx, uname, pwd, "")


@message("session.logout")
def logout(ctx: CallContext) -> str:
    if ctx.session is not None:  # always for a call (it takes a session); never inside the daemon
        ctx.api.sessions.end(ctx.session.ref)
    return ""


@message("session.local_logout")
def local_logout(ctx: CallContext) -> str:
    if ctx.session is not None:  # always for a call (it takes a session); never inside the daemon
        ctx.api.sessions.end(ctx.session.ref)
    return ""
