"""Storage repositories made of real files: ``file`` SRs (a directory of disk images) and
``iso`` SRs (a read-only directory of ISO images).

Everything here blocks (file I/O): callers run it through the thread pool.  Failures raise
:class:`StorageError`, which the API layer turns into ``SR_BACKEND_FAILURE``.  A disk is
created under a temporary name and renamed into place only when complete, and destroyed by
renaming it to ``*.deleting`` before the object goes, so a crash at any point leaves files
that :meth:`FileSR.scan` can reconcile with the objects (see :mod:`xapid.objects.sr`).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

SPARSE_CHUNK = 1 << 20
DELETING = ".deleting"
PARTIAL = ".partial"
READY = ".ready"  # a new disk whole and synced, waiting for its record: published when one exists


def disk_of(name: str) -> str:
    """The disk location a ``<location>.partial`` or ``<location>.ready`` file is for."""
    return name.removesuffix(PARTIAL).removesuffix(READY)


#: in a file SR: one empty marker per disk file xapid created; a file without one is never changed
OWNED = ".xapid-owned"
KNOWN_STAMP = ".since"  # in OWNED: ownership is recorded here (disks known before were marked once)
#: device_config keys of remote SRs (NFS, cifs, iSCSI …), which xapid does not implement
REMOTE_KEYS = ("server", "serverpath", "username", "cifspassword", "cifspassword_secret", "target",
               "targetIQN", "SCSIid", "device")
#: parts of the state dir that are never an SR
STATE_SUBDIRS = ("suspend", "tls", "sim", "xen", "kernels")


class StorageError(Exception):
    """A storage operation failed: *status* a short cause (an errno name), *reason* one line."""

    def __init__(self, reason: str, status: str = "ERROR"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class UnknownSRType(StorageError):
    pass


def _os_error(what: str, exc: OSError) -> StorageError:
    status = errno.errorcode.get(exc.errno or 0, "ERROR")
    return StorageError(f"{what}: {exc.strerror or exc}", status)


@dataclass(frozen=True)
class DiskFile:
    """What a scan finds: one disk image file."""

    uuid: str
    location: str  # file name inside the SR directory
    virtual_size: int
    physical_utilisation: int
    format: str  # raw, qcow2, iso
    owned: bool = True  # created by xapid (else adopted: read-only, never deleted)


@dataclass(frozen=True)
class SRStats:
    physical_size: int
    physical_utilisation: int


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def have_qemu_img() -> bool:
    return shutil.which("qemu-img") is not None


def _qcow2_virtual_size(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(32)
    if header[:4] != b"QFI\xfb":
        raise StorageError(f"{path.name}: not a qcow2 image")
    return int.from_bytes(header[24:32], "big")


@dataclass(frozen=True)
class StorageRoots:
    """Where SRs may live (``[storage] roots``, real paths), and the state dir's own files."""

    roots: tuple[str, ...]
    state_dir: str

    @classmethod
    def build(cls, roots: tuple[str, ...], state_dir: str, local_sr: str = "", iso_library: str = "") -> StorageRoots:
        """The configured *roots*, or without any: the state dir and the first-start SRs' directories."""
        chosen = roots or (state_dir, local_sr or os.path.join(state_dir, "sr"),
                           iso_library or os.path.join(state_dir, "iso"))
        return cls(tuple(dict.fromkeys(os.path.realpath(r) for r in chosen)), os.path.realpath(state_dir))

    def check(self, device_config: dict[str, str]) -> str:
        """The SR directory of *device_config* (resolved); StorageError naming why it is refused."""
        location = device_config.get("location") or device_config.get("path") or ""
        if not location:
            raise StorageError("device_config needs a 'location' (the directory)", "EINVAL")
        kind = device_config.get("type", "")
        if kind:
            raise StorageError(f"device_config type {kind!r}: remote (cifs, NFS) SRs are not supported; "
                               "location must be a local directory", "EINVAL")
        remote = [k for k in REMOTE_KEYS if k in device_config]
        if remote:
            raise StorageError(f"device_config {remote[0]!r}: remote (NFS, cifs, iSCSI) SRs are not supported; "
                               "location must be a local directory", "EINVAL")
        if "://" in location or location.startswith("//") or "\\" in location:
            raise StorageError(f"location {location!r} is a network share (cifs, NFS, smb://): only local "
                               "directories are supported", "EINVAL")
        if not location.startswith("/") or "\0" in location:
            raise StorageError(f"location {location!r} is not a local absolute path (host:/path NFS exports "
                               "are not supported)", "EINVAL")
        real = os.path.realpath(location)
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots):
            raise StorageError(f"location {location!r} (resolved: {real}) is not inside a storage root "
                               f"([storage] roots: {', '.join(self.roots)})", "EACCES")
        own = [self.state_dir] + [os.path.join(self.state_dir, d) for d in STATE_SUBDIRS]
        if real == self.state_dir or any(real == d or real.startswith(d + "/") for d in own[1:]):
            raise StorageError(f"location {location!r} (resolved: {real}) holds the daemon's own state", "EACCES")
        return real


class _DirectorySR:
    """An SR that is one directory; each VDI a file in it named by its ``location``."""

    read_only = True
    mode = 0o755

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def attach(self, create: bool = False) -> None:
        """Check (or create) the directory; StorageError when it is unusable."""
        try:
            if create:
                self.path.mkdir(parents=True, exist_ok=True, mode=self.mode)
            if not self.path.is_dir():
                raise StorageError(f"{self.path} is not a directory")
            if not self.read_only and not os.access(self.path, os.W_OK | os.X_OK):
                raise StorageError(f"{self.path} is not writable")
        except OSError as exc:
            raise _os_error(str(self.path), exc) from None

    def file(self, location: str) -> Path:
        if "/" in location or location.startswith("."):
            raise StorageError(f"bad VDI location {location!r}")
        return self.path / location


class FileSR(_DirectorySR):
    """A directory; each VDI a sparse raw file ``<uuid>.img`` (or ``<uuid>.qcow2``)."""

    type = "file"
    content_type = "user"
    read_only = False
    mode = 0o700

    def __init__(self, path: str | Path, disk_format: str = "raw"):
        super().__init__(path)
        self.format = disk_format

    # Ownership: xapid marks a disk file it creates (before the file exists) and unmarks it once the
    # file is gone.  A file without a mark (adopted by a scan) is never resized, renamed or deleted.

    def attach(self, create: bool = False) -> None:
        super().attach(create)
        try:
            (self.path / OWNED).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _os_error(str(self.path / OWNED), exc) from None

    def _marker(self, location: str) -> Path:
        return self.path / OWNED / self.file(location).name

    def mark_known(self, locations: list[str]) -> None:
        """On the first attach by a version that records ownership, mark the disks the database
        already knows as xapid's (an older xapid created them and deleted them freely), so an
        upgrade keeps them writable; from then on only disks xapid creates are marked."""
        stamp = self.path / OWNED / KNOWN_STAMP
        if stamp.exists():
            return
        try:
            for location in locations:
                path = self.file(location)
                if path.is_file() and not path.is_symlink():
                    self._marker(location).touch(mode=0o600)
            stamp.touch(mode=0o600)
        except OSError as exc:
            raise _os_error(str(stamp), exc) from None

    def owns(self, location: str) -> bool:
        return self._marker(location).is_file()

    def _claim(self, final: Path) -> None:
        """Mark *final* (not yet existing) as xapid's; StorageError if a file of that name exists."""
        if final.exists() or final.is_symlink():
            raise StorageError(f"{final.name} already exists in {self.path}: never overwritten", "EEXIST")
        (self.path / OWNED).mkdir(mode=0o700, exist_ok=True)
        self._marker(final.name).touch(mode=0o600)

    def _publish(self, partial: Path, final: Path) -> None:
        """Rename *partial* to *final* without ever replacing an existing file."""
        os.link(partial, final)
        os.unlink(partial)

    def _unclaim(self, location: str) -> None:
        self._marker(location).unlink(missing_ok=True)

    # for a caller that fills a new disk itself (a raw import into the SR): claim the name, write
    # ``<name>.partial``, then :meth:`make_ready` and :meth:`publish_new`, or unclaim the name when it fails
    claim = _claim
    unclaim = _unclaim

    def begin(self, uuid: str, size: int) -> tuple[str, int]:
        """A new raw disk of *size* bytes to be filled by the caller: its name claimed, its data in a
        sparse ``<name>.partial`` file; returns (location, a descriptor open for writing).  Until
        :meth:`publish_new` the disk is not under its name, so a crash leaves only the partial file,
        which the next attach removes (:meth:`scan`, :meth:`remove_partial`)."""
        final = self.path / f"{uuid}.img"
        partial = self.sibling(final.name, PARTIAL)
        self._claim(final)
        try:
            fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            self._unclaim(final.name)
            raise _os_error(f"creating a {size}-byte disk in {self.path}", exc) from None
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            self.remove_partial(partial.name)
            raise _os_error(f"creating a {size}-byte disk in {self.path}", exc) from None
        return final.name, fd

    def make_ready(self, location: str) -> None:
        """A disk made by :meth:`begin`, its data written and synced, becomes ``<name>.ready``:
        whole, but under its name only once its record is committed (:meth:`publish_new`).  After a
        crash the next attach publishes it if its record exists and removes it otherwise."""
        try:
            os.rename(self.sibling(location, PARTIAL), self.sibling(location, READY))
        except OSError as exc:
            raise _os_error(f"completing {location}", exc) from None

    def sibling(self, location: str, suffix: str) -> Path:
        """The file of disk *location* in one of its states (:data:`PARTIAL`, :data:`READY`)."""
        return self.file(location + suffix)

    def publish_new(self, location: str) -> None:
        """Put a disk made ready by :meth:`make_ready` under its name."""
        try:
            self._publish(self.sibling(location, READY), self.file(location))
        except OSError as exc:
            raise _os_error(f"publishing {location}", exc) from None

    def _owned(self, location: str, what: str) -> Path:
        path = self.file(location)
        if not self.owns(location):
            raise StorageError(f"cannot {what} {location}: the file was not created by xapid (adopted by a scan), "
                               "so it is never changed or deleted; VDI.forget drops the record", "EPERM")
        return path

    def stats(self) -> SRStats:
        try:
            st = os.statvfs(self.path)
            used = sum(_allocated(p) for p in self.path.iterdir() if p.is_file())
        except OSError as exc:
            raise _os_error(str(self.path), exc) from None
        return SRStats(st.f_blocks * st.f_frsize, used)

    def create(self, uuid: str, size: int) -> DiskFile:
        """A new sparse disk of *size* bytes, complete before it appears under its name."""
        suffix = ".qcow2" if self.format == "qcow2" else ".img"
        final = self.path / f"{uuid}{suffix}"
        partial = self.path / f"{uuid}{suffix}{PARTIAL}"
        try:
            if self.format == "qcow2":
                self._claim(final)
                result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(partial), str(size)],
                                        capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    raise StorageError(f"qemu-img create failed: {result.stderr.strip() or result.returncode}")
            else:
                _, fd = self.begin(uuid, size)  # the name claimed, the sparse partial file made
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._publish(partial, final)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            self._unclaim(final.name)
            raise _os_error(f"creating a {size}-byte disk in {self.path}", exc) from None
        except StorageError as exc:
            partial.unlink(missing_ok=True)
            if exc.status != "EEXIST":
                self._unclaim(final.name)
            raise
        return DiskFile(uuid, final.name, size, _allocated(final), self.format)

    def resize(self, location: str, size: int) -> None:
        path = self._owned(location, "resize")
        try:
            if path.suffix == ".qcow2":
                result = subprocess.run(["qemu-img", "resize", "-q", str(path), str(size)], capture_output=True,
                                        text=True, timeout=60)
                if result.returncode != 0:
                    raise StorageError(f"qemu-img resize failed: {result.stderr.strip()}")
            else:
                os.truncate(path, size)
        except OSError as exc:
            raise _os_error(f"resizing {path.name}", exc) from None

    def copy_from(self, source: Path, uuid: str) -> DiskFile:
        """A new disk with the contents of *source*; holes stay holes (sparse copy)."""
        suffix = ".qcow2" if source.suffix == ".qcow2" else ".img"
        final = self.path / f"{uuid}{suffix}"
        partial = self.path / f"{uuid}{suffix}{PARTIAL}"
        try:
            self._claim(final)
            size = source.stat().st_size
            with open(source, "rb") as src, open(partial, "xb") as dst:
                os.fchmod(dst.fileno(), 0o600)
                while True:
                    chunk = src.read(SPARSE_CHUNK)
                    if not chunk:
                        break
                    if chunk.count(0) == len(chunk):
                        dst.seek(len(chunk), os.SEEK_CUR)
                    else:
                        dst.write(chunk)
                dst.truncate(size)
                dst.flush()
                os.fsync(dst.fileno())
            self._publish(partial, final)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            self._unclaim(final.name)
            raise _os_error(f"copying {source.name} into {self.path}", exc) from None
        virtual = _qcow2_virtual_size(final) if suffix == ".qcow2" else size
        return DiskFile(uuid, final.name, virtual, _allocated(final), "qcow2" if suffix == ".qcow2" else "raw")

    def mark_deleting(self, location: str) -> None:
        """First step of destroying a disk: it keeps its data until :meth:`purge` (only xapid's own files)."""
        if not self.file(location).exists():
            return
        path = self._owned(location, "destroy")
        try:
            os.replace(path, path.with_name(path.name + DELETING))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error(f"destroying {path.name}", exc) from None

    def unmark_deleting(self, location: str) -> None:
        path = self.file(location)
        marked = path.with_name(path.name + DELETING)
        if marked.exists() and self.owns(location) and not path.exists():
            os.replace(marked, path)

    def purge(self, location: str) -> None:
        if self.owns(location):  # a foreign *.deleting file is left alone
            self.file(location).with_name(location + DELETING).unlink(missing_ok=True)
            self._unclaim(location)

    def scan(self) -> tuple[list[DiskFile], list[str], list[str]]:
        """(disks, disks being deleted, partial and ready files) found in the directory."""
        disks, deleting, partial = [], [], []
        try:
            entries = sorted(self.path.iterdir())
        except OSError as exc:
            raise _os_error(f"scanning {self.path}", exc) from None
        for path in entries:
            name = path.name
            if name.endswith(DELETING):
                deleting.append(name[: -len(DELETING)])
                continue
            if name.endswith((PARTIAL, READY)):
                partial.append(name)
                continue
            stem, dot, ext = name.rpartition(".")
            if not dot or ext not in ("img", "qcow2", "raw") or not path.is_file():
                continue
            try:
                uuid = str(uuidlib.UUID(stem))
            except ValueError:
                uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, str(path)))
            try:
                virtual = _qcow2_virtual_size(path) if ext == "qcow2" else path.stat().st_size
                disks.append(DiskFile(uuid, name, virtual, _allocated(path), "qcow2" if ext == "qcow2" else "raw",
                                      self.owns(name)))
            except (OSError, StorageError):
                continue  # unreadable: skipped rather than failing the whole scan
        return disks, deleting, partial

    def remove_partial(self, name: str) -> None:
        """Remove xapid's ``<name>.partial`` or ``<name>.ready`` (and the claim of ``<name>`` when
        no file has it)."""
        final = disk_of(name)
        if self.owns(final):  # a foreign *.partial file is left alone
            (self.path / name).unlink(missing_ok=True)
            if not (self.path / final).exists():
                self._unclaim(final)


class IsoSR(_DirectorySR):
    """A read-only directory of ``*.iso`` files, each exposed as a VDI for CD drives."""

    type = "iso"
    content_type = "iso"

    def stats(self) -> SRStats:
        try:
            st = os.statvfs(self.path)
            used = sum(p.stat().st_size for p in self.path.glob("*.iso") if p.is_file())
        except OSError as exc:
            raise _os_error(str(self.path), exc) from None
        return SRStats(st.f_blocks * st.f_frsize, used)

    def scan(self) -> tuple[list[DiskFile], list[str], list[str]]:
        disks = []
        try:
            entries = sorted(self.path.iterdir())
        except OSError as exc:
            raise _os_error(f"scanning {self.path}", exc) from None
        for path in entries:
            if path.suffix.lower() == ".iso" and path.is_file():
                uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"xapid-iso:{path.resolve()}"))
                size = path.stat().st_size
                disks.append(DiskFile(uuid, path.name, size, size, "iso", False))
        return disks, [], []


SR_TYPES: dict[str, type[FileSR | IsoSR]] = {"file": FileSR, "iso": IsoSR}


def open_sr(sr_type: str, device_config: dict[str, str], disk_format: str = "raw",
            roots: StorageRoots | None = None) -> FileSR | IsoSR:
    """The SR driver for a type and its device_config (``location`` = the directory), checked
    against *roots* when given (StorageError naming why a location is refused)."""
    location = device_config.get("location") or device_config.get("path")
    if sr_type not in SR_TYPES:
        raise UnknownSRType(sr_type)
    if roots is not None:
        location = roots.check(device_config)
    if not location:
        raise StorageError("device_config needs a 'location' (the directory)")
    if sr_type == "file":
        return FileSR(location, disk_format)
    if sr_type == "iso":
        return IsoSR(location)
    raise UnknownSRType(sr_type)
