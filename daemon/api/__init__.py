"""berthd's API: the handlers behind each method of its socket, and the contract.

    schema    every method, its parameters and its reply, declared once (typed records,
              validated at the edge before a handler runs)
    core      version, introspection, namespaces, containers, events
    tasks     tasks and processes (onto berth.daemon.tasks)
    storage   content, images, snapshots, diff, leases, gc (onto berth.daemon.storage)

Runs in berthd's trio loop. May import everything of berth.daemon but the CLI and the
gRPC front end.
"""
