"""berthd and the berth CLI. Importing this package must stay cheap and trio-free: the CLI
imports from it, and the CLI must start fast."""

__version__ = "0.1.0"
