"""The ``xapid`` command line: serve, user, cert, db, check-config, schema-doc (the client verbs live in :mod:`xapid.client`)."""
