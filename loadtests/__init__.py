"""Locust load tests for Tessera (see loadtests/README.md)."""
