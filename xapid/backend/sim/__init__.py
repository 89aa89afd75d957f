"""The simulated Xen host: its model (:mod:`.model`: domains, devices, counters, the rules a
hypervisor enforces), the per-domain counter frames (:mod:`.counters`) and the driver
(:mod:`.driver`: :class:`SimBackend`, the :class:`~xapid.backend.interface.IBackend` on top)."""

from xapid.backend.sim.driver import SimBackend
from xapid.backend.sim.model import (
    IO_RATES,
    IO_REQUEST_SIZE,
    NO_PV_DRIVERS,
    PIF_BASE_RATE,
    guest_agent_keys,
)

__all__ = ["IO_RATES", "IO_REQUEST_SIZE", "NO_PV_DRIVERS", "PIF_BASE_RATE", "SimBackend", "guest_agent_keys"]
