"""Consoles over the API port: /console by CONNECT or WebSocket, and the relays behind it."""
