"""The task service: one shim per task, supervised; recovered after a daemon restart.

    service   `TaskService`: create, start, kill, exec, delete, wait; the event relay from
              each shim; recovery of every task in the state dir
    shims     the zygote that forks shims, and connecting to / watching a shim
    rootfs    the embedded default root filesystem (busybox-static)

Runs in berthd's trio loop. May import berth.daemon's pure leaves, rpc, events, metadata
and storage (for a container's snapshot mounts), and berth.shim (its wire kernel, its
state and exit files, ShimConfig), and the API contract (api.schema) for the records it
takes; never the handlers, the CLI or the gRPC front end.
"""
