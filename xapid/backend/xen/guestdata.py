"""What a guest and the tools publish in xenstore, read by the ``xen`` driver (:class:`GuestData`)."""

from __future__ import annotations

import errno

from xapid.backend.interface import (
    GUEST_KEYS_MAX,
    GUEST_SUBTREES,
    GuestData,
    guest_text,
)
from xapid.backend.xen.core import XenCore
from xapid.backend.xen.libs import XenError


class GuestView(XenCore):
    """Reads the guest agent's keys, PV-driver state and console locations."""

    # -- guest data --------------------------------------------------------------------

    def guest_data(self, uuid: str) -> GuestData:
        """What the guest and the tools publish under ``/local/domain/<domid>``.

        * the agent's keys: the :data:`GUEST_SUBTREES` walked breadth first, every node with a
          value or without children, at most :data:`GUEST_KEYS_MAX` of them (2 × that many nodes
          looked at: a guest owns its subtrees and could fill them);
        * PV drivers: a ``device/vif`` or ``device/vbd`` frontend in XenbusStateConnected (4);
        * the console: ``console/tty`` (xenconsoled's pty; an HVM guest's serial
          ``serial/0/tty`` otherwise), ``console/vnc-port``/``vnc-listen`` (written by libxl
          from qemu's answer when the device model serves VNC).
        """
        raw = self._find(uuid)
        home = f"/local/domain/{raw.domain}"
        xs = self._store()

        def read(rel: str) -> bytes | None:
            try:
                return xs.read(f"{home}/{rel}")
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return None
                raise

        def children(rel: str) -> list[str]:
            try:
                return xs.directory(f"{home}/{rel}")
            except XenError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES):
                    return []
                raise

        with self._hypercall("read the guest's xenstore data", uuid):
            agent: dict[str, str] = {}
            pending = [f"{tree}/{name}" for tree in GUEST_SUBTREES for name in children(tree)]
            looked = 0
            while looked < len(pending) and len(agent) < GUEST_KEYS_MAX and looked < 2 * GUEST_KEYS_MAX:
                rel = pending[looked]
                looked += 1
                below = children(rel)
                value = read(rel)
                if value is not None and (value or not below):
                    agent[guest_text(rel)] = guest_text(value)
                pending += [f"{rel}/{name}" for name in below]
            connected = any(read(f"device/{kind}/{devid}/state") == b"4"
                            for kind in ("vif", "vbd") for devid in children(f"device/{kind}"))
            tty = read("console/tty") or read("serial/0/tty") or b""
            port = (read("console/vnc-port") or b"").decode(errors="replace").strip()
            listen = read("console/vnc-listen") or b""
        return GuestData(agent=agent, pv_drivers_detected=connected, tty=guest_text(tty),
                         vnc_port=int(port) if port.isdigit() and int(port) < 65536 else -1,
                         vnc_listen=guest_text(listen))
