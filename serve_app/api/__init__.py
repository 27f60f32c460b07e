"""The HTTP API: request parsing, the JSON error shape, routes. See ``routes.build_asgi_app``."""
