"""One router per resource: jobs, their metrics, layers, logs and events; the cluster; health; Prometheus."""
