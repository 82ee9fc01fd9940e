"""Telling operators what is going on: health, JSON status, Prometheus metrics."""
