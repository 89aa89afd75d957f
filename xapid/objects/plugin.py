"""``host.call_plugin``: run a root-owned plugin from ``[security] plugin_dir``, as xapi does.

xapi's convention (``xapi_plugins.ml``): the plugin is executed with one argument, an XML-RPC
``methodCall`` of *fn* whose parameters are the caller's session ref and *args* as a struct of
strings; it prints an XML-RPC ``methodResponse`` on stdout, whose single string is the result.
A fault answer is ``XENAPI_PLUGIN_FAILURE ["fault", code, reason]``; a XenAPI-style
``{"Status": "Failure", "ErrorDescription": [code, …]}`` answer raises that error.

Only a plain file directly in the directory is run: its name has no ``/``, is not ``.`` or
``..`` and does not start with ``.``; it is owned by root, not writable by group or others,
executable, and the directory itself is root-owned and not group/other-writable.  The checks
are made on the opened file (``O_NOFOLLOW``) and it is executed through ``/proc/self/fd`` when
possible, so it cannot be swapped between check and run.  Anything else is
``XENAPI_MISSING_PLUGIN [name]``.  The plugin runs in the thread pool without a shell, with a
minimal environment, no stdin, its output bounded, and a timeout (then it is killed:
``XENAPI_PLUGIN_FAILURE ["timeout", …]``).
"""

from __future__ import annotations

import os
import stat
import subprocess
import xmlrpc.client

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import message

DEFAULT_DIR = "/etc/xapi.d/plugins"
TIMEOUT = 300.0  # seconds
MAX_OUTPUT = 4 << 20
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def missing(name: str) -> XenAPIError:
    return XenAPIError("XENAPI_MISSING_PLUGIN", name)


def _trusted(st: os.stat_result, owner: int) -> bool:
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def open_plugin(directory: str, name: str, owner: int = 0) -> int:
    """An open descriptor of the plugin *name*, checked; XENAPI_MISSING_PLUGIN otherwise."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 255:
        raise missing(name)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise missing(name) from None
    try:
        if not _trusted(os.fstat(dir_fd), owner):
            raise missing(name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:
            raise missing(name) from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _trusted(st, owner) or not st.st_mode & stat.S_IXUSR:
        os.close(fd)
        raise missing(name)
    return fd


def encode_call(session: str, fn: str, args: dict[str, str]) -> str:
    return xmlrpc.client.dumps((session, dict(args)), methodname=fn, allow_none=False)


def decode_answer(stdout: str) -> str:
    """The plugin's result from its methodResponse, or the error xapi raises."""
    try:
        params, _ = xmlrpc.client.loads(stdout)
    except xmlrpc.client.Fault as fault:
        raise XenAPIError("XENAPI_PLUGIN_FAILURE", "fault", str(fault.faultCode), str(fault.faultString)) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable answer
        raise XenAPIError("XENAPI_PLUGIN_FAILURE", "failed to parse plugin output", stdout[:4096],
                          type(exc).__name__) from None
    if len(params) == 1 and isinstance(params[0], str):
        return params[0]
    if len(params) == 1 and isinstance(params[0], dict) and params[0].get("Status") == "Failure":
        description = params[0].get("ErrorDescription") or ["XENAPI_PLUGIN_FAILURE"]
        raise XenAPIError(*[str(d) for d in description])
    if len(params) == 1 and isinstance(params[0], dict) and params[0].get("Status") == "Success":
        return str(params[0].get("Value", ""))
    raise XenAPIError("XENAPI_PLUGIN_FAILURE", "unexpected XMLRPC result", stdout[:4096], "")


def run_plugin(directory: str, name: str, call: str, timeout: float = TIMEOUT, owner: int = 0) -> str:
    """Run the checked plugin with *call* as its argument (blocking: the thread pool runs this)."""
    fd = open_plugin(directory, name, owner)
    try:
        exe = f"/proc/self/fd/{fd}"
        if not os.path.exists(exe):
            exe = os.path.join(directory, name)
        try:
            proc = subprocess.run([exe, call], executable=exe, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, env=ENV, cwd="/", pass_fds=(fd,), close_fds=True, shell=False, check=False)
        except subprocess.TimeoutExpired as exc:
            raise XenAPIError("XENAPI_PLUGIN_FAILURE", "timeout", _text(exc.stdout), _text(exc.stderr)) from None
        except OSError as exc:
            raise XenAPIError("XENAPI_PLUGIN_FAILURE", "cannot execute", "", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    out, err = _text(proc.stdout), _text(proc.stderr)
    if proc.returncode < 0:
        raise XenAPIError("XENAPI_PLUGIN_FAILURE", f"signal: {-proc.returncode}", out, err)
    if proc.returncode != 0:
        raise XenAPIError("XENAPI_PLUGIN_FAILURE", "non-zero exit", out, err)
    return decode_answer(_text(proc.stdout, MAX_OUTPUT))


def _text(data: bytes | None, limit: int = 4096) -> str:
    return (data or b"")[:limit].decode("utf-8", "replace")


@message("host.call_plugin")
async def call_plugin(ctx: CallContext, host: str, plugin: str, fn: str, args: dict[str, str]) -> str:
    api = ctx.api
    directory = getattr(api, "plugin_dir", DEFAULT_DIR) or DEFAULT_DIR
    owner = getattr(api, "plugin_owner", 0)
    timeout = getattr(api, "plugin_timeout", TIMEOUT)
    session = ctx.session.ref if ctx.session is not None else ""
    call = encode_call(session, fn, args)
    return await api.runner.run(run_plugin, directory, plugin, call, timeout, owner)
