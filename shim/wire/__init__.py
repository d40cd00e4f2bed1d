"""The wire kernel: what berthd, its shims, the CLI and berth-grpc share to talk.

    protocol   sans-IO framing, typed events, bounded buffers, version negotiation
    errors     the closed error vocabulary (containerd's errdefs), mapped across the wire
    names      the rule for names that become paths (IDs, namespaces)
    status     task states, exit statuses and event topics, defined once
    unixsock   path-based UNIX sockets (long paths, peer credentials)
    client     the blocking client (CLI, tests, scripts), with deadlines and liveness

Import-light and trio-free: every CLI start imports it. It imports nothing else of berth
(an import-linter contract in scripts/lint keeps it so).
"""
