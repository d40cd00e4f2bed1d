"""containerd's gRPC API, served by berth-grpc (a process of its own: grpcio is large and
threaded, and berthd stays single-threaded and small).

    main         berth-grpc's entry point: the grpc.aio server on the containerd socket
    supervisor   berthd's side: start berth-grpc, restart it if it dies
    services/    one module per containerd service, translating onto berthd's own API,
                 and their binding to containerd's service descriptors
    convert      containerd's encodings (Any/JSON specs, runtime options, timestamps,
                 metrics, event envelopes) to and from berth's plain values
    client       the asyncio client of berthd's socket that the services use

The only place grpcio and protobuf are imported (an import-linter contract). berth-grpc's
modules may import berth.daemon's pure leaves and berth.shim's wire kernel, never trio,
the task service or the storage stack (it reaches them only through berthd's socket);
`supervisor` is berthd's side (trio, and the process helpers of the task service).
"""
