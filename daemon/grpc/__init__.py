"""containerd's gRPC API, served by berth-grpc (a process of its own: it outlives berthd's
restarts, so clients never see the containerd socket go, and protobuf stays out of berthd).

    main         berth-grpc's entry point: the sockets, replacement, stopping
    http2        HTTP/2 for a gRPC server, sans-IO (bytes in, events out; hpack decodes)
    h2server     gRPC over that HTTP/2 on asyncio: the containerd socket
    ttrpc        the same methods over ttrpc (`<address>.ttrpc`)
    calls        what a call is to both: status codes, routes, the handler's context
    supervisor   berthd's side: start berth-grpc, restart it if it dies
    services/    one module per containerd service, translating onto berthd's own API,
                 and their binding to containerd's service descriptors
    convert      containerd's encodings (Any/JSON specs, runtime options, timestamps,
                 metrics, event envelopes) to and from berth's plain values
    client       the asyncio client of berthd's socket that the services use

The only place protobuf and hpack are imported (an import-linter contract). berth-grpc's
modules may import berth.daemon's pure leaves and berth.shim's wire kernel, never trio,
the task service or the storage stack (it reaches them only through berthd's socket);
`supervisor` is berthd's side (trio, and the process helpers of the task service).
"""
