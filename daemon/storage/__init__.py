"""The storage stack: content, snapshots, layers, images, registries, leases and GC.

    content     the content store: sha256 blobs and resumable ingests
    snapshots   snapshotters (overlayfs, native): layered root filesystems as mount lists
    archive     applying a layer tar (openat2-confined, sparse-preserving) and computing diffs
    images      OCI/Docker image documents, platforms, chain IDs, runtime specs from configs
    registry    the OCI distribution client (pull/push over httpx)
    service     `Storage`: the above scoped by namespace, with leases, import/export, unpack
    gc          mark and sweep over images, containers, leases and gc.ref labels
    generation  a count of content record changes, for berth-grpc's kept answers

Trio-free (berthd runs the heavy parts in worker threads) and usable without the task
service. May import berth.daemon's pure leaves and berth.shim's wire kernel, mount and fs
helpers; never the task service, the API, the CLI or the gRPC front end.
"""
