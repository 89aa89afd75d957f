"""Disk transfers over the API's HTTP port: raw and VHD disk images, sparse-aware, and the
transfer slots shared with the XVA export/import."""
