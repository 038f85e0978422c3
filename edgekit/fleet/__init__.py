"""Fleet review: the telemetry collector, its store, and the reports an operator reads.

``store`` (SQLAlchemy Core: SQLite or PostgreSQL, migrations), ``collector``
(the FastAPI ingest and query API), ``report`` (the per-device and fleet-wide
numbers), ``html`` (the self-contained HTML report). The wire contract is
``device_agent.telemetry_schema``; drift scores come from ``device_agent.drift``.
Nothing here is imported by ``edgekit --help``.
"""
