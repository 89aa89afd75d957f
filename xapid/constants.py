"""Constants more than one layer uses: sizes, dom0's UUID, a guest's device slots."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096  # a Xen memory page, in bytes

#: the control domain's UUID (xapi's and xl's), the same on every driver
DOM0_UUID = "00000000-0000-0000-0000-000000000000"

# Slot limits, as xapi's allowed-device lists: 16 disk slots for PV guests (xvda…xvdp), 4 emulated IDE
# slots for HVM guests without PV drivers (hda…hdd), 7 network slots.
PV_DISK_SLOTS = 16
HVM_DISK_SLOTS = 4
NIC_SLOTS = 7
