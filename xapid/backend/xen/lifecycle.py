"""Domain lifecycle of the ``xen`` driver: build, pause, shut down, reboot, suspend/resume, resize."""

from __future__ import annotations

import os
import pathlib
import select
import time

from xapid.backend.interface import (
    BackendError,
    DomainInfo,
    DomainSpec,
    InvalidSpec,
    NotEnoughMemory,
    ShutdownTimeout,
)
from xapid.backend.specs import (
    MIN_DOMAIN_MEMORY,
    check_boot,
    spec_from_json,
    validate_spec,
)
from xapid.backend.xen import domconfig
from xapid.backend.xen.core import POLL, RELEASE, VCPU_SETTLE
from xapid.backend.xen.domains import DomainTable
from xapid.backend.xen.libs import XenError
from xapid.backend.xen.monitor import DomainMonitor
from xapid.backend.xen.xenctrl import (
    XcDomainInfo,
    XEN_DOMINF_dying,
    XEN_DOMINF_shutdown,
)
from xapid.backend.xen.xenlight import XenLightError
from xapid.backend.xen.xenstore import XenStore
from xapid.constants import DOM0_UUID, KiB, MiB


def _overhead(spec: DomainSpec) -> int:
    """Memory a domain costs beyond its RAM: 1 MiB per possible vCPU, page tables (1/256)."""
    return spec.vcpus_max * MiB + -(-spec.memory_static_max // 256)


class Lifecycle(DomainTable, DomainMonitor):
    """Builds domains through libxl and changes their state, one operation at a time per domain."""

    def create_domain(self, spec: DomainSpec, paused: bool) -> DomainInfo:
        """Validate, build through libxl (paused), set the scheduler, unpause unless *paused*."""
        validate_spec(spec, self.boot_policy)
        with self._operating(spec.uuid):
            self._check_buildable(spec)
            self._build(spec, paused, self._clock(), 0)
            return self.domain_info(spec.uuid)

    def _check_buildable(self, spec: DomainSpec) -> None:
        if spec.uuid == DOM0_UUID or any(raw.uuid == spec.uuid for raw in self._raw_domains()):
            raise InvalidSpec(f"a domain with handle {spec.uuid} exists", spec.uuid)
        needed = spec.memory_target + _overhead(spec)
        available = self._make_room(needed)
        if needed > available:
            raise NotEnoughMemory(f"domain needs {needed} bytes, {available} available", str(needed), str(available))

    def _build(self, spec: DomainSpec, paused: bool, start_time: float, cpu_offset: int,
               image: pathlib.Path | None = None) -> int:
        # libxl gets the resolved paths: a symlink swapped after the check cannot redirect it
        config = domconfig.domain_config_json(check_boot(spec, self.boot_policy))
        xl = self._light()
        try:
            with self._libxl("libxl could not build the domain"):
                if image is None:
                    domid = xl.create(config)
                else:
                    with open(image, "rb") as stream:
                        domid = xl.restore(config, stream.fileno())
        except OSError as exc:
            raise BackendError(f"cannot read the image {image}: {exc.strerror}", str(image)) from None
        try:
            self._save_record(spec, start_time, cpu_offset)  # sched_params were applied by libxl
            if not paused:
                xl.unpause(domid)
        except (XenError, XenLightError, OSError) as exc:
            self._destroy(domid, spec.uuid)
            raise BackendError(f"could not start domain {domid}: {exc}", spec.uuid) from None
        return domid

    def _destroy(self, domid: int, uuid: str) -> None:
        with self._libxl(f"libxl could not destroy domain {domid}"):
            self._light().destroy(domid)

    def destroy_domain(self, uuid: str) -> None:
        """Tear the domain down at once, in any state."""
        with self._operating(uuid, keeps=False):
            raw = self._guest(uuid, "destroy")
            self._destroy(raw.domain, uuid)
            self._forget(uuid)

    def pause_domain(self, uuid: str) -> None:
        """Pause a running domain."""
        raw = self._guest(uuid, "pause")
        self._require(raw, "running", "pause")
        with self._hypercall(f"pause domain {raw.domain}", uuid):
            self._ctrl().domain_pause(raw.domain)

    def unpause_domain(self, uuid: str) -> None:
        """Unpause a paused domain."""
        raw = self._guest(uuid, "unpause")
        self._require(raw, "paused", "unpause")
        with self._hypercall(f"unpause domain {raw.domain}", uuid):
            self._ctrl().domain_unpause(raw.domain)

    def _wait_shutdown(self, uuid: str, domid: int, timeout: float) -> XcDomainInfo | None:
        """Wait until domain *domid* has shut down (returned) or vanished (None); ShutdownTimeout."""
        watcher = XenStore()
        try:
            watcher.watch(RELEASE, "wait")
            deadline = time.monotonic() + timeout
            while True:
                raw = next((r for r in self._raw_domains() if r.domain == domid), None)
                if raw is None or raw.flags & (XEN_DOMINF_shutdown | XEN_DOMINF_dying):
                    return raw
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ShutdownTimeout(f"domain {domid} did not shut down within {timeout:g} s", uuid)
                select.select([watcher.fileno()], [], [], min(left, POLL))
                while watcher.check_watch() is not None:
                    pass
        finally:
            watcher.close()

    def _request(self, raw: XcDomainInfo, request: str) -> None:
        path = f"/local/domain/{raw.domain}/control/shutdown"
        try:
            self._store().write(path, request)
        except XenError as exc:
            raise BackendError(f"cannot ask domain {raw.domain} to {request}: {exc.strerror}", raw.uuid) from None

    def shutdown_domain(self, uuid: str, reason: str, timeout: float) -> None:
        """Write *reason* to ``control/shutdown``, wait for the guest, destroy; rebuild for 'reboot'."""
        if reason not in ("poweroff", "reboot"):
            raise BackendError(f"unknown shutdown reason {reason!r}", reason)
        with self._operating(uuid, keeps=reason == "reboot"):
            raw = self._guest(uuid, "shut down")
            self._require(raw, "running", f"{reason} cleanly")
            spec = self._spec(uuid) if reason == "reboot" else None
            self._request(raw, reason)
            try:
                self._wait_shutdown(uuid, raw.domain, timeout)
            except ShutdownTimeout:
                try:
                    self._store().write(f"/local/domain/{raw.domain}/control/shutdown", "")
                except XenError:
                    pass
                raise
            self._destroy(raw.domain, uuid)
            if spec is None:
                self._forget(uuid)
            else:
                self._build(spec, False, self._clock(), 0)

    def reboot_domain(self, uuid: str) -> DomainInfo:
        """Hard reboot: destroy and rebuild from the same spec, running, CPU time reset."""
        with self._operating(uuid):
            raw = self._guest(uuid, "reboot")
            spec = self._spec(uuid)
            self._destroy(raw.domain, uuid)
            self._build(spec, False, self._clock(), 0)
            return self.domain_info(uuid)

    def suspend_domain(self, uuid: str, path: str, timeout: float) -> None:
        """Save a running domain through libxl to the file *path* (written then renamed), destroy it."""
        with self._operating(uuid, keeps=False):
            raw = self._guest(uuid, "suspend")
            self._require(raw, "running", "suspend")
            record = self._record(uuid)
            partial = f"{path}.partial"
            try:
                with open(partial, "wb") as out:
                    with self._libxl(f"libxl could not suspend domain {raw.domain}"):
                        self._light().suspend(raw.domain, out.fileno())
                    out.flush()
                    os.fsync(out.fileno())
                done = self._wait_shutdown(uuid, raw.domain, timeout)
                if done is not None and done.shutdown_reason != "suspend":
                    raise BackendError(f"domain {raw.domain} shut down ({done.shutdown_reason}) while suspending", uuid)
                os.replace(partial, path)
            except OSError as exc:
                raise BackendError(f"cannot write the image {path}: {exc.strerror}", path) from None
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
            cpu = raw.cpu_time + record.get("cpu_offset", 0)
            self._destroy(raw.domain, uuid)
            if record:
                spec = spec_from_json(record["spec"])
                self._save_record(spec, record.get("start_time", 0.0), cpu)

    def resume_domain(self, spec: DomainSpec, path: str, paused: bool) -> DomainInfo:
        """Rebuild a suspended domain from the image at *path*, keeping its CPU time."""
        validate_spec(spec, self.boot_policy)
        if not os.path.isfile(path):
            raise BackendError(f"no suspend image at {path}", path)
        with self._operating(spec.uuid):
            self._check_buildable(spec)
            record = self._record(spec.uuid)
            self._build(spec, paused, self._clock(), record.get("cpu_offset", 0), image=pathlib.Path(path))
            return self.domain_info(spec.uuid)

    def set_vcpus(self, uuid: str, count: int) -> None:
        """Bring vCPUs 0..count-1 online and the rest offline (``cpu/N/availability``)."""
        raw = self._guest(uuid, "change the vCPUs of")
        maximum = raw.max_vcpu_id + 1
        if not 1 <= count <= maximum:
            raise InvalidSpec(f"{count} vCPUs not in 1..{maximum}", uuid)
        base = f"/local/domain/{raw.domain}/cpu"

        def write(t: int) -> None:
            for vcpu in range(maximum):
                self._store().write(f"{base}/{vcpu}/availability", "online" if vcpu < count else "offline", t)

        with self._hypercall(f"change the vCPUs of domain {raw.domain}", uuid):
            self._store().transact(write)
        deadline = time.monotonic() + VCPU_SETTLE
        while self._find(uuid).nr_online_vcpus != count and time.monotonic() < deadline:
            time.sleep(0.01)

    def set_memory_target(self, uuid: str, target: int) -> None:
        """Set the balloon target, at most the static maximum, through ``libxl_set_memory_target``
        (enforced: the hypervisor ceiling follows, video RAM and the PoD target included)."""
        raw = self._guest(uuid, "set the memory of")
        maximum = self._static_max(raw)
        if not MIN_DOMAIN_MEMORY <= target <= maximum:
            raise InvalidSpec(f"memory target {target} not in {MIN_DOMAIN_MEMORY}..{maximum}", uuid)
        with self._libxl(f"libxl could not set the memory target of domain {raw.domain}"):
            self._light().set_memory_target(raw.domain, target // KiB, relative=False, enforce=True)
        try:
            record = self._record(uuid)
            if record:
                self._save_record(spec_from_json(record["spec"]), record.get("start_time", 0.0),
                                  record.get("cpu_offset", 0), target)
        except OSError as exc:
            raise BackendError(f"cannot record the memory target of domain {raw.domain}: {exc.strerror}",
                               uuid) from None
