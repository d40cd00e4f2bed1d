"""What the tests share: real daemons in private temp dirs (helpers), dockerd/ctr/berth-grpc
fixtures (clients), test images built from busybox-static (images), a real registry with
TLS and a token service (registry), and a minimal subreaper init (reaper)."""
