"""Tests of the service: job spec, engine on a real local Ray, store, job manager and the REST API."""
