"""Prefect flows and tasks that wire actors and storage, deployments, and the CLI."""
