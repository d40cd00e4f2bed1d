"""Network attachments: CNI networks and the network namespaces berth owns.

    netns   persistent network namespaces: a namespace kept alive by a bind mount of its
            nsfs file onto a file under the state dir (what `ip netns add` does)
    cni     the CNI 1.0 runtime side: network config lists from a conf dir, plugins run as
            the spec says (ADD in order, DEL in reverse, CHECK), every ADD result kept
            durably (CHECK and DEL need it, and a restarted berthd must release what a
            crash left attached)

Usable without the task service (a mount list or a netns path is all they share with it).
Trio for the plugin processes; may import berth.daemon's pure leaves and berth.shim's wire
kernel and native bindings; never the task service, the API, the CLI or the gRPC front end.
"""
