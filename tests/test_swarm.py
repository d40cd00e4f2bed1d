"""Swarm on berth: a dockerd 20.10 in swarm mode (in a network namespace of its own) runs
a replicated service on berth's containerd socket; its replicas keep running through a
kill -9 of berthd, and a rolling update interrupted by another kill -9 completes. This is
what engines that outgrow one host do on berth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clients import Dockerd, docker_engine
from tests.support.helpers import Daemon, wait_until

pytestmark = pytest.mark.container

IMAGE = "busybox:swarm"
SERVICE = "web"


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[Daemon, Dockerd]]:
    with docker_engine(IMAGE, swarm=True) as (daemon, dockerd):
        dockerd.ok("swarm", "init", "--advertise-addr", "127.0.0.1", timeout=120)
        try:
            yield daemon, dockerd
        finally:
            dockerd.docker("service", "rm", SERVICE, timeout=60)
            dockerd.docker("swarm", "leave", "--force", timeout=60)


def _running(dockerd: Dockerd) -> set[str]:
    """The service's containers dockerd reports running."""
    out = dockerd.ok(
        "ps", "-q", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={SERVICE}"
    )
    return set(out.split())


def _berth_running(daemon: Daemon) -> set[str]:
    """The tasks berth itself reports running in dockerd's namespace."""
    tasks = daemon.client().call("tasks.list", {})["tasks"]
    return {t["id"] for t in tasks if t.get("status") == "running"}


def _settled(dockerd: Dockerd, daemon: Daemon, replicas: int) -> bool:
    running = _running(dockerd)
    return len(running) == replicas and running <= _berth_running(daemon)


def test_replicas_scale_and_survive_a_berthd_kill(swarm: tuple[Daemon, Dockerd]) -> None:
    daemon, dockerd = swarm
    dockerd.ok(
        "service", "create", "--detach", "--name", SERVICE, "--replicas", "3",
        "--no-resolve-image", "--stop-grace-period", "1s", IMAGE, "sleep", "1000",
        timeout=120,
    )  # fmt: skip
    wait_until(lambda: _settled(dockerd, daemon, 3), timeout=120, interval=1, what="3 replicas")
    dockerd.ok("service", "scale", "--detach", f"{SERVICE}=5")
    wait_until(lambda: _settled(dockerd, daemon, 5), timeout=120, interval=1, what="5 replicas")
    before = _running(dockerd)
    daemon.restart()  # kill -9, then a new berthd
    wait_until(lambda: _berth_running(daemon) >= before, timeout=60, what="berth's tasks back")
    assert _running(dockerd) == before  # the same containers: none restarted or lost


def test_a_rolling_update_completes_across_a_berthd_kill(swarm: tuple[Daemon, Dockerd]) -> None:
    daemon, dockerd = swarm
    wait_until(lambda: _settled(dockerd, daemon, 5), timeout=120, interval=1, what="5 replicas")
    old = _running(dockerd)
    dockerd.ok(
        "service", "update", "--detach", "--no-resolve-image", "--env-add", "GENERATION=2",
        "--update-parallelism", "1", "--update-delay", "1s", SERVICE,
        timeout=120,
    )  # fmt: skip
    wait_until(lambda: bool(old - _running(dockerd)), timeout=120, what="the update to begin")
    daemon.restart()  # in the middle of the update
    wait_until(
        lambda: _settled(dockerd, daemon, 5) and not (_running(dockerd) & old),
        timeout=240,
        interval=2,
        what="every replica replaced",
    )

    def update_state() -> str:
        return dockerd.ok("service", "inspect", "-f", "{{.UpdateStatus.State}}", SERVICE).strip()

    # "completed" once the last replica has run for the monitoring period (5 s)
    wait_until(lambda: update_state() == "completed", timeout=60, what="the update completed")
    for cid in _running(dockerd):
        env = dockerd.ok("inspect", "-f", "{{.Config.Env}}", cid)
        assert "GENERATION=2" in env, env
