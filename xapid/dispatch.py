"""Dispatch one decoded call, checking in xapi's order.

method known (MESSAGE_METHOD_UNKNOWN) → argument count (MESSAGE_PARAMETER_COUNT_MISMATCH) →
session (SESSION_INVALID) → removed class (MESSAGE_REMOVED) → role (RBAC_PERMISSION_DENIED)
→ argument types and refs (FIELD_TYPE_ERROR, INVALID_VALUE, HANDLE_INVALID) → the explicit
handler, or the generic one derived from the schema.  ``Async.`` calls become tasks.

The result is always a Deferred: it fires with the call's value once the call's writes are
durable, or fails with :class:`XenAPIError` (anything unexpected is logged with its
traceback and becomes INTERNAL_ERROR carrying only a short id that the log line repeats).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from xapid.apitypes import DEFAULT_LIMITS, NULL_REF, coerce
from xapid.audit import CallAudit
from xapid.context import CallContext
from xapid.errors import (
    XenAPIError, handle_invalid, internal_error_with_id, method_unknown, parameter_count_mismatch, session_invalid,
)
from xapid.auth import ownership
from xapid.auth.rbac import permission_denied
from xapid.objects import generic
from xapid.schema import READ_ONLY, MessageSpec

__all__ = ["CallContext", "Dispatcher", "Handler"]  # CallContext lives in xapid.context

log = Logger()

Handler = Callable[..., Any]


class Dispatcher:
    def __init__(self, api: Any, handlers: dict[str, Handler]):
        self.api = api
        self.schema = api.schema
        self.handlers = handlers
        self.limits = getattr(api, "limits", None) or DEFAULT_LIMITS  # string, set and map bounds
        undeclared = sorted(set(handlers) - {m for m, s in self.schema.messages.items() if s.explicit})
        missing = sorted({m for m, s in self.schema.messages.items() if s.explicit} - set(handlers))
        if undeclared or missing:
            raise ValueError(f"handlers and schema disagree: no handler for {missing}, undeclared {undeclared}")

    def call(self, method: str, params: list[Any], client: Any = None) -> Deferred:
        """:meth:`_call`, written to the audit log when it writes or logs in (:mod:`xapid.audit`)."""
        note = CallAudit.begin(getattr(self.api, "audit", None), self.schema, self.api.sessions, method, params,
                               client)
        if note is None:
            return self._call(method, params, client)
        return self._call(method, params, client).addBoth(note.finish)

    def _call(self, method: str, params: list[Any], client: Any = None) -> Deferred:
        """Run one call; see the module docstring for the order of checks.

        *client* is the caller's connection (its source address, and whether it has shown a
        valid session, which this marks); handlers see it as ``ctx.client``.

        Calls that finish at once and wrote nothing durable (most reads) are answered without
        a coroutine; the others finish in :meth:`_finish`.
        """
        seq_before, rollbacks_before = self.api.store.seq, self.api.store.rollbacks
        try:
            spec, result = self._dispatch(method, params, client)
        except XenAPIError as error:
            return fail(error)
        except Exception as exc:  # noqa: BLE001 - the one edge where surprises become INTERNAL_ERROR
            return fail(self._unexpected(method, exc))
        durable = spec.role != READ_ONLY  # read-only calls make no stored changes
        if isinstance(result, Deferred):
            if not durable:  # a deferred reply (event.from): no coroutine around it
                return result.addErrback(self._failed, method)
        elif not inspect.isawaitable(result) and not (durable and self.api.store.seq != seq_before):
            return succeed(result)
        return ensureDeferred(self._finish(method, result, durable, seq_before, rollbacks_before))

    def _failed(self, failure: Any, method: str) -> Any:
        if failure.check(XenAPIError, CancelledError):
            return failure
        return Failure(self._unexpected(method, failure.value, failure))

    async def _finish(self, method: str, result: Any, durable: bool, seq_before: int, rollbacks_before: int = 0) -> Any:
        """The call's value once its writes are committed; a failed commit (rolled back by the
        store) answers its error, as does a failed commit during the call, which undid what the
        call had written so far."""
        try:
            if inspect.isawaitable(result):
                result = await result
        except (XenAPIError, CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._unexpected(method, exc) from None
        finally:
            store = self.api.store
            if durable and store.seq != seq_before:
                await store.flush()
                if store.rollbacks != rollbacks_before and store.rollback_error is not None \
                        and not method.startswith("Async."):  # an Async call's task reports its own outcome
                    raise store.rollback_error
        return result

    def _unexpected(self, method: str, exc: BaseException, failure: Failure | None = None) -> XenAPIError:
        """INTERNAL_ERROR with a fresh id, never the exception's text; the log line (with the
        traceback) repeats the id."""
        incident, error = internal_error_with_id()
        log.failure("unexpected error in {method} (internal error id {incident})", failure, method=method,
                    incident=incident)
        return error

    def _dispatch(self, method: str, params: list[Any], client: Any = None) -> tuple[MessageSpec, Any]:
        """The message called and the handler's result (a value or an awaitable)."""
        is_async = method.startswith("Async.")
        name = method[6:] if is_async else method
        spec = self.schema.messages.get(name)
        if spec is None:
            raise method_unknown(method)
        if is_async and not spec.is_async:
            raise XenAPIError("Fault", f"No async mode for this operation (rpc: {method})")
        args = list(params)
        session = None
        if spec.session:
            if not args:
                raise parameter_count_mismatch(method, len(spec.params), 0)
            session_ref = args.pop(0)
        if not spec.min_params <= len(args) <= len(spec.params):
            raise parameter_count_mismatch(method, len(spec.params), len(args))
        if spec.session:
            session = self.api.sessions.touch(session_ref)
            if session is None:
                raise session_invalid(session_ref)
            if client is not None:
                client.authenticated = True
            if self.schema.classes[spec.cls].removed or spec.removed:
                raise XenAPIError("MESSAGE_REMOVED")
            if not self.schema.role_allows(session.role, spec.role):
                raise permission_denied(self.schema, session.role, spec.wire_name.lower(), spec.role)
        values = [self._check(p, v) for p, v in zip(spec.params, args)]
        values += [p.default for p in spec.params[len(values):]]
        if session is not None:
            ownership.check(self.api, session, spec, values)  # whose task or session (xapid/auth/ownership.py)
        if is_async:
            return spec, self.api.tasks.run_async(session, spec,
                                                  lambda task: self._run(spec, session, values, task, client))
        return spec, self._invoke(spec, session, values, None, client)

    def _check(self, param: Any, value: Any) -> Any:
        value = coerce(param.type, value, param.name, self.schema.enums, self.limits)
        if param.type.kind == "ref" and param.type.name in self.schema.classes:
            if value == NULL_REF and param.null:  # declared null="true": the handler gives NULL its meaning
                return value
            if not self.api.store.exists(value, param.type.name):
                raise handle_invalid(param.type.name, value)
        return value

    def _invoke(self, spec: MessageSpec, session: Any, values: list[Any], task: str | None,
                client: Any = None) -> Any:
        """The handler's result: a value, or an awaitable for multi-step handlers."""
        ctx = CallContext(self.api, session, spec, task, client)
        if spec.explicit:
            return self.handlers[spec.wire_name](ctx, *values)
        return generic.run(ctx, spec, values)

    async def _run(self, spec: MessageSpec, session: Any, values: list[Any], task: str, client: Any = None) -> Any:
        """An Async.* call's work, awaited inside its task (which turns success only after a flush:
        :mod:`xapid.tasks`); a failed commit during it undid its writes, so it fails with that error."""
        store = self.api.store
        rollbacks_before = store.rollbacks
        result = self._invoke(spec, session, values, task, client)
        result = await result if inspect.isawaitable(result) else result
        await store.flush()
        if store.rollbacks != rollbacks_before and store.rollback_error is not None:
            raise store.rollback_error
        return result

