"""Xen-API failures as data: ``XenAPIError(code, *params)``.

Handlers raise these; the wire layer turns them into the protocol's failure envelope in
one place.  Every code used here is declared in ``xapid/data/xenapi.xml`` (a test checks it).
"""

from __future__ import annotations


class XenAPIError(Exception):
    """A Xen-API failure: ``ErrorDescription = [code, *params]`` on the wire."""

    def __init__(self, code: str, *params: object):
        self.code = code
        self.params = tuple(str(p) for p in params)
        super().__init__(code, *self.params)

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]

    def __repr__(self) -> str:
        return f"XenAPIError{tuple(self.description)!r}"


def method_unknown(method: str) -> XenAPIError:
    return XenAPIError("MESSAGE_METHOD_UNKNOWN", method)


def parameter_count_mismatch(method: str, expected: int, received: int) -> XenAPIError:
    return XenAPIError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, expected, received)


def session_invalid(ref: object) -> XenAPIError:
    return XenAPIError("SESSION_INVALID", ref if isinstance(ref, str) else "")


def handle_invalid(cls: str, ref: object) -> XenAPIError:
    return XenAPIError("HANDLE_INVALID", cls, ref)


def uuid_invalid(cls: str, uuid: str) -> XenAPIError:
    return XenAPIError("UUID_INVALID", cls, uuid)


def field_type_error(field: str) -> XenAPIError:
    return XenAPIError("FIELD_TYPE_ERROR", field)


def invalid_value(field: str, value: object) -> XenAPIError:
    return XenAPIError("INVALID_VALUE", field, value)


def internal_error(message: str) -> XenAPIError:
    return XenAPIError("INTERNAL_ERROR", message)


def internal_error_with_id() -> tuple[str, XenAPIError]:
    """A fresh incident id and the INTERNAL_ERROR naming it: what a caller sees of a surprise
    (never the exception's text); log the id with the traceback."""
    import secrets

    incident = secrets.token_hex(4)
    return incident, XenAPIError("INTERNAL_ERROR", f"internal error, id {incident}; see the daemon log")


def operation_not_allowed(reason: str) -> XenAPIError:
    return XenAPIError("OPERATION_NOT_ALLOWED", reason)


def vm_bad_power_state(vm: str, expected: list[str], actual: str) -> XenAPIError:
    """xapi's form: lower-case states, allowed ones joined by ", " in xapi's order."""
    order = ["halted", "paused", "suspended", "running"]
    wanted = sorted({s.lower() for s in expected}, key=order.index)
    return XenAPIError("VM_BAD_POWER_STATE", vm, ", ".join(wanted), actual.lower())
