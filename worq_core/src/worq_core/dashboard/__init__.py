"""The worq web dashboard: queues, jobs, the dead-letter queue, workers and schedules in a browser.

Install the extra (``pip install 'worq-core[dashboard]'``: Starlette, uvicorn and Jinja2) and run
``worq dashboard myapp:app`` (or ``worq dashboard --broker redis://...`` with no app code). In
code, :func:`create_app` builds the ASGI application for any :class:`~worq_core.Worq` app, to
serve with any ASGI server or mount inside an existing one.

Every page is served from the installed package (no CDN: it works offline), reads a bounded
amount from the broker per request (counts, one page of a listing, one job), and updates itself
in place. Safe by default: the CLI binds to 127.0.0.1, requests for any other host name are
refused (against DNS rebinding), every action that changes state is a POST carrying the
dashboard's token (a cross-site page can neither read it nor forge the request), ``read_only``
removes the actions, and user data (arguments, errors, tracebacks) is always escaped under a
strict Content-Security-Policy.
"""

from __future__ import annotations

from worq_core.dashboard.server import DashboardConfig, create_app, hosts_for, running, serve

__all__ = ["DashboardConfig", "create_app", "hosts_for", "running", "serve"]
