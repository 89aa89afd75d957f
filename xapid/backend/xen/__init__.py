"""The Xen driver: ctypes bindings for the Xen 4.17 tools libraries and the driver on top.

One module per library (:mod:`.toollog`, :mod:`.xenctrl`, :mod:`.xenstore`); :mod:`.libs`
finds them by name and checks the ABI; :mod:`.watches` delivers xenstore watch events
through the Twisted reactor; :mod:`.driver` is the :class:`IBackend` implementation.
"""
