"""The ``xen`` driver: :class:`IBackend` on libxenctrl, libxenstore and libxenlight.

How it acts, as a toolstack does:

* domains are listed with one ``xc_domain_getinfolist``; a domain's handle is its VM uuid;
* a build turns the :class:`DomainSpec` into libxl's JSON domain config
  (:mod:`xapid.backend.xen.domconfig`), has libxl build it paused (libxl applies the
  ``sched_params`` for whichever scheduler runs: credit, credit2, rtds, null) and unpauses it
  unless asked to keep it paused; when memory is short dom0 is ballooned down first, as xl's
  autoballoon does (``[xen] autoballoon``);
* clean shutdown, reboot and suspend are requests written to the guest's
  ``control/shutdown`` (suspend through libxl, which does the same and saves the image);
  the driver then waits for the hypervisor to report the domain shut down, woken by the
  ``@releaseDomain`` watch, and gives up with :class:`ShutdownTimeout`;
* the memory target is set by ``libxl_set_memory_target`` (``memory/target``, video RAM, PoD
  target, ``/vm/<uuid>/memory``), vCPU hot-plug writes the ``cpu/N/availability`` nodes;
* libxl runs children (hotplug scripts, bootloader, save helper, device model): the libxl
  context is put in ``libxl_sigchld_owner_mainloop`` mode, and the reactor tells libxl about
  every SIGCHLD (:class:`LibxlReaper`), with a 1 s poll as a safety net;
* libxl's and libxc's diagnostics go to a log file (rotated by size); the error lines of a
  failed call become the ``diagnostics`` of the :class:`BackendError` (the Xen-API error's
  parameters);
* xenstored and privcmd are probed every second; a lost connection is reopened with backoff
  (watch re-armed, domains compared again); down longer than ``xenstored_timeout`` is fatal
  (``on_fatal`` with one line: the daemon exits non-zero for systemd to restart it);
* domains that shut down, crash or vanish on their own are reported to the listener given
  to :meth:`XenBackend.watch_domains`, from the ``@releaseDomain`` watch read in the reactor.

What the driver keeps itself (``<state_dir>/domains/<uuid>.json``, rewritten atomically):
each running domain's spec (to rebuild it on reboot), build time and the CPU time it had
before a suspend.  :meth:`XenBackend.open` refuses with :class:`HypervisorUnavailable` (one
line) when there is no hypervisor, the libraries are missing or not Xen 4.17, or a
connection cannot be made.  Every other method may block: the API layer runs them in a
thread pool.

:class:`XenBackend` is assembled from one class per concern: :mod:`.core` (connections, dom0
memory, build records, lookups), :mod:`.monitor`, :mod:`.domains`, :mod:`.lifecycle`, :mod:`.devices`,
:mod:`.hostfacts`, :mod:`.guestdata`, :mod:`.consoles` and :mod:`.counters`.
"""

from __future__ import annotations

from collections.abc import Sequence

from zope.interface import implementer

from xapid.backend.interface import IBackend
from xapid.backend.xen import domconfig
from xapid.backend.xen.consoles import Consoles
from xapid.backend.xen.counters import CounterReader
from xapid.backend.xen.devices import disk_devid
from xapid.backend.xen.guestdata import GuestView
from xapid.backend.xen.libs import PRIVCMD_PATHS, XenUnavailable, check_hypervisor
from xapid.backend.xen.lifecycle import Lifecycle

__all__ = ["XenBackend", "disk_devid", "domconfig", "hypervisor_present"]


@implementer(IBackend)
class XenBackend(CounterReader, Lifecycle, GuestView, Consoles):
    """Drives the local Xen hypervisor.

    *xenctrl_lib*, *xenlight_lib*, *privcmd*, *sysfs* and *procfs* are seams for tests (fake
    libraries, a fake ``/sys`` tree).
    """

    name = "xen"


def hypervisor_present(privcmd: Sequence[str] = PRIVCMD_PATHS) -> bool:
    """Whether this machine runs on Xen with a hypercall interface (``--backend auto``)."""
    try:
        check_hypervisor(privcmd)
    except XenUnavailable:
        return False
    return True
