"""syncbn's service: job spec, Ray Train engine, job manager, store, REST API, dashboard and CLI."""
