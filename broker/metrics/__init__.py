"""Prometheus metrics: what operators graph and alert on.

Two sources, because `web` runs several gunicorn processes and `worker` is its own:
- `store.StoreCollector` reads the state store at scrape time (instances, replication
  facts, operations, failovers and their phases): every process answers the same, so
  any `web` process (or `serve`) can be scraped;
- `instruments` holds what only a process itself knows (the monitor's probes and
  checks, operation retries, cloud API errors): each worker serves its own endpoint
  (`endpoint.serve_metrics`), `serve` adds them to its API's `/metrics`.
"""
