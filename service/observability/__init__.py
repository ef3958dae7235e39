"""What an operator sees of a running process: Prometheus metrics (`metrics`, every name defined
once), the metrics HTTP endpoint (`http`: GET /metrics and /healthz), and logging (`logs`).

Imports nothing of the rest of service/ but settings, so every room may import it.
"""
