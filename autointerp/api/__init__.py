"""The HTTP API and web pages: `create_app()` (FastAPI), served by `autointerp serve`."""

from .app import Settings, create_app, openapi_schema

__all__ = ["create_app", "Settings", "openapi_schema"]
