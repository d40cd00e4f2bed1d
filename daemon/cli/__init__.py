"""`berth`, the command-line client (like containerd's ctr), one module per group of verbs.

    main      the entry point: global options, the verb table, the connection (Session),
              run/tasks/containers/namespaces/events and the IO plumbing of attached runs
    storage   images, content, snapshots, leases, gc (imported only when used)

Trio-free and import-light (every start pays for what it imports): may import the wire
kernel (berth.shim.wire) and berth.daemon's pure leaves, nothing else.
"""
