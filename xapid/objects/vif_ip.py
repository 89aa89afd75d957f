"""``VIF.configure_ipv4`` / ``configure_ipv6``: the IP configuration a guest agent is asked to apply.

As xapi (``xapi_vif.ml``): for Static the address must be CIDR (``INVALID_CIDR_ADDRESS_SPECIFIED
[address]``) and the gateway, when given, an address (``INVALID_IP_ADDRESS_SPECIFIED
[gateway]``); the VM's guest metrics must advertise ``feature-static-ip-setting = 1``
(``VM_LACKS_FEATURE [vm]``); then the mode, ``[address]`` and the gateway are stored.  xapid
records them (guest agents read them from the record); it does not push them into the guest.
"""

from __future__ import annotations

import ipaddress

from xapid.context import CallContext
from xapid.errors import XenAPIError
from xapid.objects import called, message

FEATURE = "feature-static-ip-setting"


def _check(ctx: CallContext, vif: str, version: int, mode: str, address: str, gateway: str) -> None:
    if mode == "Static":
        addr, slash, prefix = address.partition("/")
        try:
            if not slash or not prefix.isdigit():
                raise ValueError(address)
            ipaddress.ip_interface(address)
            if ipaddress.ip_address(addr).version != version:
                raise ValueError(address)
        except ValueError:
            raise XenAPIError("INVALID_CIDR_ADDRESS_SPECIFIED", "address") from None
        if gateway:
            try:
                if ipaddress.ip_address(gateway).version != version:
                    raise ValueError(gateway)
            except ValueError:
                raise XenAPIError("INVALID_IP_ADDRESS_SPECIFIED", "gateway") from None
    vm = ctx.store.get(ctx.store.get(vif, "VIF").fields["VM"], "VM")
    metrics = ctx.store.find(vm.fields["guest_metrics"])
    if metrics is None or metrics.fields.get("other", {}).get(FEATURE) != "1":
        raise XenAPIError("VM_LACKS_FEATURE", vm.ref)


@message("VIF.configure_ipv4", "VIF.configure_ipv6")
def configure(ctx: CallContext, vif: str, mode: str, address: str, gateway: str) -> str:
    version = 6 if called(ctx).name == "configure_ipv6" else 4
    _check(ctx, vif, version, mode, address, gateway)
    prefix = f"ipv{version}_"
    ctx.store.update(vif, {prefix + "configuration_mode": mode, prefix + "addresses": [address],
                           prefix + "gateway": gateway})
    return ""
