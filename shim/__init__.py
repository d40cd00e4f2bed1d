"""berth's per-container shim: owns one container, outlives the daemon.

Kept import-light on purpose: the CLI and the zygote import from this package, and every
module a shim imports costs memory in every container.
"""
