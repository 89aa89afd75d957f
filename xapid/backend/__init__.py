"""Hypervisor backends: the driver interface (:mod:`.interface`) and its drivers."""
