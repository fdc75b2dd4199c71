"""What operators watch: the Prometheus metrics, the ops HTTP port (health, status) and the
lifecycle that every process role reports."""
