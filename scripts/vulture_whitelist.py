"""Names vulture (scripts/lint) takes for dead code that are not: used by tests, by an
interface (io.RawIOBase), by another process's decoder (msgspec records, protobuf
messages filled field by field), or parsed for completeness from an image config."""

# ruff: noqa
# API contract records (daemon/api/schema.py): fields are the wire format.
revision, chain_id, kept, long, host_port, container_port, host_ip  # noqa
# io.RawIOBase interface of the hashing reader/writer (daemon/storage/archive.py)
readable, readinto, writable  # noqa
# protobuf Metrics messages filled field by field (daemon/grpc/convert.py)
usage_usec, user_usec, system_usec, nr_periods, nr_throttled, throttled_usec  # noqa
usage_limit, oom_kill, kernel, periods, throttled_periods, throttled_time, failcnt  # noqa
# re2.Options attribute set before compile (daemon/filters.py)
log_errors, max_mem  # noqa
# image config fields parsed for completeness (daemon/storage/images.py)
stop_signal, architecture, blkio  # noqa
# used by tests: counters and conversions they check
skipped_devices, subscriber_count, from_timestamp, frame_message  # noqa
# gRPC's full table of status codes (daemon/grpc/calls.py): the protocol's, not all sent
ABORTED, DATA_LOSS, UNAUTHENTICATED  # noqa
# HTTP/2's full tables of error codes and settings (daemon/grpc/http2.py): RFC 9113's,
# not all used; and the hpack decoder's table limit, set on it
INTERNAL_ERROR, SETTINGS_TIMEOUT, CANCEL, CONNECT_ERROR, INADEQUATE_SECURITY  # noqa
HTTP_1_1_REQUIRED, HEADER_TABLE_SIZE, max_allowed_table_size  # noqa
# a module stand-in's identity, read by the import system (daemon/deferred.py)
__spec__, __file__, __class__  # noqa
