"""xapid: a Xen Management API (Xen-API) daemon for a Xen host."""

__version__ = "0.1.0"
