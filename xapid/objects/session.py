"""``session.*``: password login against the users file, logout."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.logger import Logger

from xapid.errors import XenAPIError
from xapid.objects import message
from xapid.users import UsersError

log = Logger()


def user_object(store: Any, name: str) -> str:
    """The ``user`` object mirroring a users-file entry; ref and uuid derive from the name, so
    they stay the same across restarts although user objects are not stored."""
    uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"xapid-user:{name}"))
    ref = f"OpaqueRef:{uuid}"
    if store.find(ref) is None:
        store.add("user", {"uuid": uuid, "short_name": name, "fullname": name}, ref=ref)
    return ref


async def _login(ctx: Any, uname: str, pwd: str, originator: str) -> str:
    users = ctx.api.users

    def check() -> Any:
        try:
            users.reload_if_changed()
        except UsersError as error:  # a bad edit of the file: keep serving the previous table
            log.error("users file not reloaded: {error}", error=str(error))
        return users.verify(uname, pwd)

    user = await ctx.api.runner.run(check)
    if user is None:
        log.warn("failed login for {user!r} by {originator!r}", user=uname, originator=originator)
        await ctx.api.sleep(ctx.api.auth_failure_delay)
        raise XenAPIError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
    session = ctx.api.sessions.create(user.name, user.role, originator, ctx.api.host_ref, user_object(ctx.store, user.name))
    return session.ref


@message("session.login_with_password")
async def login_with_password(ctx: Any, uname: str, pwd: str, version: str, originator: str) -> str:
    """A session for a user of the users file; the same failure for any bad credential."""
    return await _login(ctx, uname, pwd, originator)


@message("session.slave_local_login_with_password")
async def slave_local_login_with_password(ctx: Any, uname: str, pwd: str) -> str:
    """On a single host this is an ordinary login."""
    return await _login(ctx, uname, pwd, "")


@message("session.logout")
def logout(ctx: Any) -> str:
    ctx.api.sessions.end(ctx.session.ref)
    return ""


@message("session.local_logout")
def local_logout(ctx: Any) -> str:
    ctx.api.sessions.end(ctx.session.ref)
    return ""
