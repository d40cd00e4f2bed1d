"""containerd's own Go client (the library dockerd, nerdctl and BuildKit link) against
berth's containerd sockets, unmodified: a probe built from Debian's containerd 1.6 sources
(tests/support/goclient), one flow per test, each something that client relies on."""

from __future__ import annotations

import pytest

from tests.support import goclient
from tests.support.helpers import Daemon

pytestmark = pytest.mark.container


_flow = goclient.flow


def test_a_fresh_namespace_gets_its_default_labels(goclient_served: tuple[Daemon, str]) -> None:
    """SetLabel on a namespace nobody created: the client's set-up of a fresh namespace
    (Namespaces.Update creates it, as containerd's store does)."""
    _flow(goclient_served, "namespace-labels")


def test_a_created_task_is_deleted_by_a_deferred_cleanup(
    goclient_served: tuple[Daemon, str],
) -> None:
    """NewTask, then Delete(WithProcessKill) without ever starting it."""
    _flow(goclient_served, "created-task-delete")


def test_container_extensions_come_back(goclient_served: tuple[Daemon, str]) -> None:
    _flow(goclient_served, "extensions")


def test_a_container_runs_and_reports_its_exit_status(goclient_served: tuple[Daemon, str]) -> None:
    """NewContainer, NewTask, Wait, Start: exit status 7 through the client's channel."""
    _flow(goclient_served, "run")


def test_the_ttrpc_client_talks_to_the_ttrpc_socket(goclient_served: tuple[Daemon, str]) -> None:
    """containerd's ttrpc library on `<address>.ttrpc`: Version, Tasks.List with the
    namespace in ttrpc's header, and NotFound with its gRPC code."""
    out = _flow(goclient_served, "ttrpc")
    assert "code = NotFound" in out
