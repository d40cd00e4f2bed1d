"""berth's network attachments on their own (daemon/network): real CNI plugins (Debian's
containernetworking-plugins), network namespaces the test makes under its own temp dir, a
bridge and a subnet of its own; after each test no address lease, veth, netns mount or NAT
rule of it is left (issue 14, first part: the components, before the task service uses
them)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.daemon.network import cni, netns
from berth.shim.wire.errors import BerthError, InvalidArgument

pytestmark = pytest.mark.container

PLUGIN_DIRS = ["/usr/lib/cni", "/opt/cni/bin"]


class Lab:
    """A temp dir with a netns dir, a host-local data dir and a bridge network of its own."""

    def __init__(self) -> None:
        if shutil.which("unshare") is None or not os.path.isdir("/usr/lib/cni"):
            pytest.fail("needs util-linux and containernetworking-plugins (scripts/setup)")
        self.dir = Path(tempfile.mkdtemp(prefix="bt-net-", dir="/tmp"))
        self.ns_dir = str(self.dir / "netns")
        netns.prepare_dir(self.ns_dir)
        tag = f"{random.randrange(1 << 24):06x}"
        self.bridge = f"bt{tag}"
        self.subnet_prefix = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.network = cni.default_bridge(
            name=f"net-{tag}",
            bridge=self.bridge,
            subnet=f"{self.subnet_prefix}.0/24",
            data_dir=str(self.dir / "ipam"),
        )
        self.plugins = cni.Plugins(PLUGIN_DIRS)
        self.namespaces: list[str] = []
        self.rules_before = _nat_rules()

    def new_netns(self, name: str) -> str:
        path = os.path.join(self.ns_dir, name)
        netns.create(path)
        self.namespaces.append(path)
        return path

    def attachment(self, cid: str, path: str, **capabilities: object) -> cni.Attachment:
        return cni.Attachment(
            network=self.network.to_doc(),
            container_id=cid,
            netns=path,
            ifname="eth0",
            capability_args=dict(capabilities),
        )

    def leases(self) -> list[str]:
        """host-local's lease files (one per address it handed out)."""
        directory = self.dir / "ipam" / self.network.name
        if not directory.is_dir():
            return []
        return [p.name for p in directory.iterdir() if p.name[0].isdigit() and "last" not in p.name]

    def cleanup(self) -> None:
        for path in self.namespaces:
            netns.remove(path)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if os.path.ismount(self.ns_dir):
            subprocess.run(["umount", "-l", self.ns_dir], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


BUILT_IN_CHAINS = frozenset({":PREROUTING", ":INPUT", ":FORWARD", ":OUTPUT", ":POSTROUTING"})


def _nat_rules() -> set[str]:
    """Every rule and chain of every iptables table (`iptables-save`, counters left out):
    what bridge (ipMasq), portmap and firewall add, and what DEL must take away again.
    Not a table's built-in chains: the kernel makes them when the table is first used
    (on a fresh machine, by the first test that attaches) and they stay, empty."""
    rules, table = set(), ""
    done = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line and not line.startswith(("#", "COMMIT")):
            if line.split()[0] in BUILT_IN_CHAINS:
                continue
            rules.add(f"{table} {line.split()[0] if line.startswith(':') else line}")
    return rules


def _in(path: str, *command: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={path}", *command],
        capture_output=True,
        text=True,
        timeout=30,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


async def test_two_namespaces_on_one_bridge_talk_and_leave_nothing(lab: Lab) -> None:
    a, b = lab.new_netns("a"), lab.new_netns("b")
    assert netns.is_pinned(a) and netns.is_pinned(b)
    first = await cni.add(lab.plugins, lab.attachment("ca", a))
    second = await cni.add(lab.plugins, lab.attachment("cb", b))
    ip_a, ip_b = (x.addresses()[0].split("/")[0] for x in (first, second))
    assert ip_a.startswith(lab.subnet_prefix) and ip_a != ip_b
    assert len(lab.leases()) == 2
    await cni.check(lab.plugins, first)
    # both ways, through the bridge
    for source, target in ((a, ip_b), (b, ip_a)):
        ping = _in(source, "busybox", "ping", "-c", "1", "-W", "3", target)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "eth0" in _in(a, "ip", "-o", "link").stdout
    # the attachment record round-trips (berthd keeps it as JSON, DEL after a restart)
    revived = cni.Attachment.from_doc(json.loads(json.dumps(first.to_doc())))
    assert revived == first
    for attachment in (revived, second):
        await cni.delete(lab.plugins, attachment)
        await cni.delete(lab.plugins, attachment)  # DEL is idempotent
    assert lab.leases() == []
    members = subprocess.run(
        ["ip", "-o", "link", "show", "master", lab.bridge], capture_output=True, text=True
    )
    assert members.stdout.strip() == ""  # no veth left on the bridge
    assert _nat_rules() <= lab.rules_before  # the masquerade rules went with DEL
    for path in (a, b):
        netns.remove(path)
        assert not os.path.exists(path)


async def test_a_published_port_is_reachable_through_the_gateway(lab: Lab) -> None:
    server_ns = lab.new_netns("srv")
    host_port = random.randrange(20000, 30000)
    mapping = [{"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]
    attachment = await cni.add(lab.plugins, lab.attachment("csrv", server_ns, portMappings=mapping))
    server = subprocess.Popen(
        ["nsenter", f"--net={server_ns}", "busybox", "nc", "-l", "-p", "8080", "-e", "echo", "hi"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        gateway = f"{lab.subnet_prefix}.1"
        for _ in range(50):  # the listener needs a moment
            try:
                with socket.create_connection((gateway, host_port), timeout=2) as conn:
                    assert conn.recv(16) == b"hi\n"
                    break
            except (ConnectionRefusedError, TimeoutError):
                import time

                time.sleep(0.1)
        else:
            pytest.fail("the published port never answered")
    finally:
        server.kill()
        server.wait(10)
    await cni.delete(lab.plugins, attachment)
    assert not any(str(host_port) in rule for rule in _nat_rules())


async def test_bad_configs_and_plugins_are_clear_errors_and_change_nothing(lab: Lab) -> None:
    conf_dir = lab.dir / "conf"
    conf_dir.mkdir()
    (conf_dir / "10-good.conflist").write_text(json.dumps(lab.network.to_doc()))
    (conf_dir / "20-bad.conflist").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"20-bad\.conflist"):
        cni.load_networks(str(conf_dir))
    (conf_dir / "20-bad.conflist").write_text(json.dumps({"name": "x", "plugins": []}))
    with pytest.raises(InvalidArgument, match="plugins"):
        cni.load_networks(str(conf_dir))
    (conf_dir / "20-bad.conflist").unlink()
    assert list(cni.load_networks(str(conf_dir))) == [lab.network.name]

    path = lab.new_netns("miss")
    missing = cni.parse_network(
        {"cniVersion": "1.0.0", "name": "nope", "plugins": [{"type": "no-such-plugin"}]}
    )
    attachment = cni.Attachment(missing.to_doc(), "cmiss", path, "eth0")
    with pytest.raises(InvalidArgument, match="no-such-plugin"):
        await cni.add(lab.plugins, attachment)
    assert attachment.result is None


async def test_an_exhausted_range_fails_and_the_failed_add_is_undone(lab: Lab) -> None:
    one = dict(lab.network.plugins[0])
    ipam = dict(one["ipam"])
    start = f"{lab.subnet_prefix}.10"
    ipam["ranges"] = [
        [{"subnet": f"{lab.subnet_prefix}.0/24", "rangeStart": start, "rangeEnd": start}]
    ]
    one["ipam"] = ipam
    lab.network = cni.Network(lab.network.name, cni.CNI_VERSION, (one,))
    a, b = lab.new_netns("one"), lab.new_netns("two")
    first = await cni.add(lab.plugins, lab.attachment("c1", a))
    assert first.addresses() == [f"{start}/24"]
    with pytest.raises(BerthError, match=r"no IP addresses available|range") as failed:
        await cni.add(lab.plugins, lab.attachment("c2", b))
    assert "network" in str(failed.value)
    assert "eth0" not in _in(b, "ip", "-o", "link").stdout  # undone: no veth left in it
    assert lab.leases() == [start]
    await cni.delete(lab.plugins, first)
    assert lab.leases() == []


# -- through berthd: `berth run --net`, restarts, clean-up ---------------------------------


class NetDaemon:
    """A berthd whose default network `bridge` has a bridge and subnet of its own (its
    addresses are leased under the daemon's state dir)."""

    def __init__(self, extra_config: str = "") -> None:
        from tests.support.helpers import Daemon

        tag = f"{random.randrange(1 << 24):06x}"
        self.bridge = f"bb{tag}"
        self.prefix = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.rules_before = _nat_rules()
        self.conf_dir = tempfile.mkdtemp(prefix="berth-cni-")  # `network create` writes here
        config = (
            "[network]\n"
            f'conf_dir = "{self.conf_dir}"\n'
            f'default_subnet = "{self.prefix}.0/24"\n'
            f'default_bridge = "{self.bridge}"\n'
        )
        self.d = Daemon(extra_config=config + extra_config)

    def leases(self) -> list[str]:
        directory = Path(self.d.state, "cni", "networks", "bridge")
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit())

    def address(self, cid: str) -> str:
        with self.d.client() as c:
            attached = c.call("attachments.get", {"container_id": cid})
        return str(attached["networks"][0]["addresses"][0]).split("/")[0]

    def cleanup(self) -> None:
        # What a failed test left attached is DELeted first (a NAT rule outlives the
        # namespace that a plain unmount would remove).
        with contextlib.suppress(Exception), self.d.client() as c:
            for left in c.call("attachments.list")["attachments"]:
                c.call("attachments.delete", {"container_id": left["container_id"]})
        self.d.cleanup()
        for path in Path(self.d.state, "netns").glob("*") if Path(self.d.state).exists() else []:
            netns.remove(str(path))
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for path in Path(self.conf_dir).glob("*.conflist"):  # bridges of networks left made
            with contextlib.suppress(ValueError, OSError, KeyError, IndexError):
                bridge = json.loads(path.read_text())["plugins"][0]["bridge"]
                subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        for path in Path(self.conf_dir).glob("*.conflist"):  # bridges of networks left made
            with contextlib.suppress(ValueError, OSError, KeyError, IndexError):
                bridge = json.loads(path.read_text())["plugins"][0]["bridge"]
                subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(self.conf_dir, ignore_errors=True)


@pytest.fixture
def netd() -> Iterator[NetDaemon]:
    n = NetDaemon()
    try:
        yield n
    finally:
        n.cleanup()


def _ok(n: NetDaemon, *args: str) -> str:
    r = n.d.cli(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout.decode()


SERVE = "while :; do nc -l -p 8080 -e echo from-$(hostname); done"


def test_two_containers_on_the_default_bridge_talk_both_ways(netd: NetDaemon) -> None:
    assert "bridge" in _ok(netd, "network", "ls")
    _ok(netd, "run", "-d", "--busybox", "--net", "bridge", "left", "sh", "-c", SERVE)
    _ok(netd, "run", "-d", "--busybox", "--net", "bridge", "right", "sh", "-c", SERVE)
    left, right = netd.address("left"), netd.address("right")
    assert left.startswith(netd.prefix) and left != right
    for source, target in (("left", right), ("right", left)):
        out = _ok(netd, "tasks", "exec", "--exec-id", f"x{source}", source, "nc", target, "8080")
        assert out.startswith("from-"), out
    listing = _ok(netd, "network", "attachments")
    assert left in listing and right in listing
    # its own /etc/hosts, hostname and resolv.conf (no loopback nameserver)
    hosts = _ok(netd, "tasks", "exec", "--exec-id", "h", "left", "cat", "/etc/hosts")
    assert f"{left}\tleft" in hosts
    assert _ok(netd, "tasks", "exec", "--exec-id", "n", "left", "hostname").strip() == "left"
    resolv = _ok(netd, "tasks", "exec", "--exec-id", "r", "left", "cat", "/etc/resolv.conf")
    assert "nameserver" in resolv and "nameserver 127." not in resolv
    for cid in ("left", "right"):
        _ok(netd, "tasks", "rm", "-f", cid)
        _ok(netd, "containers", "rm", cid)
    assert netd.leases() == []
    assert list(Path(netd.d.state, "netns").glob("*")) == []
    members = subprocess.run(
        ["ip", "-o", "link", "show", "master", netd.bridge], capture_output=True, text=True
    )
    assert members.stdout.strip() == ""
    assert _nat_rules() <= netd.rules_before


def test_a_chosen_address_events_and_tasks_info(netd: NetDaemon) -> None:
    import json as json_module
    import threading

    seen: list[dict[str, object]] = []

    def follow() -> None:
        with netd.d.client() as c:
            for envelope in c.stream("events.subscribe", {"filters": ['topic~="^/networks/"']}):
                seen.append(envelope)
                if len(seen) == 2:
                    return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    import time

    time.sleep(0.3)  # subscribed
    chosen = f"{netd.prefix}.42"
    _ok(
        netd,
        "run",
        "-d",
        "--busybox",
        "--net",
        "bridge",
        "--ip",
        f"{chosen}/24",
        "fixed",
        "sleep",
        "600",
    )
    assert netd.address("fixed") == chosen
    inside = _ok(
        netd, "tasks", "exec", "--exec-id", "a", "fixed", "ip", "-o", "-4", "addr", "show", "eth0"
    )
    assert chosen in inside
    info = json_module.loads(_ok(netd, "tasks", "info", "fixed"))
    assert info["networks"][0]["addresses"] == [f"{chosen}/24"]
    assert info["networks"][0]["interface"] == "eth0"
    bad = netd.d.cli(
        "run", "-d", "--busybox", "--net", "bridge", "--ip", "10.0.0.1", "nolen", "true"
    )
    assert bad.returncode == 1 and b"prefix length" in bad.stderr
    _ok(netd, "tasks", "rm", "-f", "fixed")
    _ok(netd, "containers", "rm", "fixed")
    follower.join(20)
    assert [e["topic"] for e in seen] == ["/networks/attach", "/networks/detach"]
    attach_event = seen[0]["event"]
    assert isinstance(attach_event, dict) and attach_event["container_id"] == "fixed"


def test_a_later_task_of_a_networked_container_is_attached_again(netd: NetDaemon) -> None:
    """Its first task's attachment goes when that task exits; `tasks start` of the same
    container gets the same networks, address and namespace path again."""
    from tests.support.helpers import wait_until

    chosen = f"{netd.prefix}.77"
    gate = Path(netd.d.dir, "gate")
    gate.mkdir()
    mount = f"type=bind,src={gate},dst=/gate"
    script = "if [ -e /gate/ran ]; then sleep 600; else touch /gate/ran; fi"  # exits, then stays
    ip = ["--net", "bridge", "--ip", f"{chosen}/24", "--mount", mount]
    _ok(netd, "run", "--busybox", *ip, "again", "sh", "-c", script)
    wait_until(lambda: netd.leases() == [], what="the first task's address released")
    _ok(netd, "tasks", "rm", "again")
    _ok(netd, "tasks", "start", "-d", "again")
    assert netd.address("again") == chosen
    inside = _ok(netd, "tasks", "exec", "--exec-id", "x", "again", "ip", "-o", "-4", "addr")
    assert chosen in inside
    _ok(netd, "tasks", "rm", "-f", "again")
    _ok(netd, "containers", "rm", "again")
    wait_until(lambda: netd.leases() == [], what="every address released")


def test_published_port_none_and_host(netd: NetDaemon) -> None:
    port = random.randrange(20000, 30000)
    _ok(
        netd,
        "run",
        "-d",
        "--busybox",
        "--net",
        "bridge",
        "-p",
        f"{port}:8080",
        "web",
        "sh",
        "-c",
        SERVE,
    )
    gateway = f"{netd.prefix}.1"
    for _ in range(100):
        try:
            with socket.create_connection((gateway, port), timeout=2) as conn:
                assert conn.recv(64).startswith(b"from-")
                break
        except (ConnectionRefusedError, TimeoutError):
            import time

            time.sleep(0.05)
    else:
        pytest.fail("the published port never answered")
    none = _ok(netd, "run", "--rm", "--busybox", "--net", "none", "n0", "ip", "-o", "link")
    assert [line.split(":")[1].strip() for line in none.splitlines()] == ["lo"]
    host = _ok(netd, "run", "--rm", "--busybox", "--net", "host", "h0", "ip", "-o", "link")
    assert netd.bridge in host  # the host's interfaces
    bad = netd.d.cli("run", "--rm", "--busybox", "--net", "no-such-net", "b0", "true")
    assert bad.returncode == 1 and b"unknown network" in bad.stderr
    # a port already published, twice in one request, or held by a host process
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        held = holder.getsockname()[1]
        refusals = {
            (f"{port}:80",): b"already published by " + netd.d.namespace.encode() + b"/web",
            (f"{port + 1}:80", f"{port + 1}:81"): b"published twice",
            (f"{held}:80",): b"in use by a process on the host",
            (f"127.0.0.1:{port}:80",): b"already published by",  # web has every address
        }
        for ports, why in refusals.items():
            options = [x for p in ports for x in ("-p", p)]
            r = netd.d.cli("run", "--rm", "--busybox", "--net", "bridge", *options, "b0", "true")
            assert r.returncode == 1 and why in r.stderr, (ports, r.stderr)
    udp = _ok(
        netd,
        "run",
        "--rm",
        "--busybox",
        "--net",
        "bridge",
        "-p",
        f"{port}:80/udp",
        "u0",
        "echo",
        "udp",
    )
    assert udp.strip() == "udp"  # the same number over UDP is another port
    assert netd.d.cli("containers", "ls").stdout.decode().count("b0") == 0  # nothing made
    from tests.support.helpers import wait_until

    def attached() -> list[str]:
        with netd.d.client() as c:
            return [a["container_id"] for a in c.call("attachments.list")["attachments"]]

    # u0's attachment goes with its removal, which `run --rm` leaves to berthd
    wait_until(lambda: attached() == ["web"], what="only web attached")
    _ok(netd, "tasks", "rm", "-f", "web")
    _ok(netd, "containers", "rm", "web")
    assert not any(str(port) in rule for rule in _nat_rules())


def test_attachments_survive_a_restart_and_the_dead_are_released(netd: NetDaemon) -> None:
    gate = Path(netd.d.dir, "gate")
    gate.mkdir()
    """10 networked containers run while berthd is killed -9: after the restart the 9 that
    kept running keep their addresses and answer; the one that exited meanwhile has its
    address released (and one that exits while berthd runs, at once)."""
    keepers = [f"stays{i}" for i in range(9)]
    for cid in keepers:
        _ok(netd, "run", "-d", "--busybox", "--net", "bridge", cid, "sh", "-c", SERVE)
    mount = f"type=bind,src={gate},dst=/gate"
    script = "while [ ! -e /gate/go ]; do sleep 0.05; done"
    _ok(
        netd,
        "run",
        "-d",
        "--busybox",
        "--net",
        "bridge",
        "--mount",
        mount,
        "goes",
        "sh",
        "-c",
        script,
    )
    kept = {cid: netd.address(cid) for cid in keepers}
    goes = netd.address("goes")
    # made for a container a client has yet to create (as `run` does): kept by a restart
    with netd.d.client() as c:
        pending = c.call("attachments.create", {"container_id": "pending"})
    pending_address = pending["networks"][0]["addresses"][0].split("/")[0]
    assert len(netd.leases()) == 11
    netd.d.kill9()
    (gate / "go").touch()  # it exits while berthd is down
    import time

    time.sleep(0.5)
    netd.d.start()
    from tests.support.helpers import wait_until

    expected = sorted([*kept.values(), pending_address])
    wait_until(lambda: netd.leases() == expected, what="the dead container's address released")
    assert {cid: netd.address(cid) for cid in keepers} == kept
    assert netd.address("pending") == pending_address
    with netd.d.client() as c:
        assert c.call("attachments.delete", {"container_id": "pending"})["released"] is True
    for cid, address in kept.items():  # connectivity, each from a new container
        out = _ok(
            netd, "run", "--rm", "--busybox", "--net", "bridge", "probe", "nc", address, "8080"
        )
        assert out.strip() == f"from-{cid}", out
    assert goes not in netd.leases()
    # one that exits while berthd runs gives its address back at once
    _ok(netd, "run", "--busybox", "--net", "bridge", "brief", "true")
    wait_until(
        lambda: netd.leases() == sorted(kept.values()),
        what="the exited container's address released",
    )
    _ok(netd, "tasks", "rm", "brief")
    _ok(netd, "containers", "rm", "brief")
    for cid in keepers:
        _ok(netd, "tasks", "rm", "-f", cid)
        _ok(netd, "containers", "rm", cid)
    _ok(netd, "tasks", "rm", "goes")
    _ok(netd, "containers", "rm", "goes")
    assert netd.leases() == []


def test_metrics_count_an_attached_container_s_network_bytes() -> None:
    """berthd's metrics: per interface of a container's own network namespace, bytes and
    packets both ways (lo left out); a host-network container reports none."""
    from tests.test_metrics import _answers, free_port, get, samples, value

    port = free_port()
    n = NetDaemon(extra_config=f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    try:
        from tests.support.helpers import wait_until

        wait_until(lambda: _answers(port), timeout=15, what="the metrics endpoint")
        blob = "while :; do nc -l -p 8080 -e head -c 300000 /dev/zero; done"
        _ok(n, "run", "-d", "--busybox", "--net", "bridge", "server", "sh", "-c", blob)
        _ok(n, "run", "-d", "--busybox", "--net", "host", "hosted", "sleep", "600")
        server = n.address("server")
        # a first scrape (it looks up once whether the task is in berthd's namespace):
        # the next ones must see the bytes sent since
        wait_until(
            lambda: "berth_container_network_transmit_bytes_total" in samples(get(port)[2]),
            timeout=15,
            what="the server's interfaces in a scrape",
        )
        before = value(
            samples(get(port)[2]), "berth_container_network_transmit_bytes_total", id="server"
        )

        def fetched() -> bool:
            r = n.d.cli(
                "run",
                "--rm",
                "--busybox",
                "--net",
                "bridge",
                "client",
                "sh",
                "-c",
                f"nc {server} 8080 | wc -c",
            )
            return r.returncode == 0 and r.stdout.strip() == b"300000"

        wait_until(fetched, timeout=30, what="300000 bytes fetched from the server")
        found = samples(get(port)[2])
        sent = value(found, "berth_container_network_transmit_bytes_total", id="server")
        assert sent - before >= 300_000
        labels = [lab for lab, _ in found["berth_container_network_transmit_bytes_total"]]
        assert {(lab["id"], lab["interface"]) for lab in labels} == {("server", "eth0")}
        assert value(found, "berth_container_network_receive_packets_total", id="server") > 0
        for cid in ("server", "hosted"):
            n.d.cli("tasks", "rm", "-f", cid)
            _ok(n, "containers", "rm", cid)
    finally:
        n.cleanup()


def _named_netns() -> set[str]:
    """`ip -all netns`'s view: what is pinned under /run/netns."""
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def _links() -> set[str]:
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines()}


def test_networks_are_created_used_and_removed(netd: NetDaemon) -> None:
    """`berth network create|rm`: a conflist in the conf dir, labels, a chosen or a free
    subnet; bad input changes nothing; no removal while attached, of the default, or of a
    file berth did not write; removal takes the bridge link with it."""
    tag = f"{random.randrange(1 << 20):05x}"
    blue, green = f"blue{tag}", f"green{tag}"
    green_prefix = f"10.{random.randrange(150, 199)}.{random.randrange(256)}"
    out = _ok(netd, "network", "create", blue, "--label", "team=a")
    name, blue_subnet, source = out.strip().split("\t")
    assert name == blue and blue_subnet.startswith("10.78.") and blue_subnet.endswith(".0/24")
    assert Path(source) == Path(netd.conf_dir, f"berth-{blue}.conflist")
    written = json.loads(Path(source).read_text())
    assert written["berth"] == {"labels": {"team": "a"}} and written["name"] == blue
    shown = json.loads(_ok(netd, "network", "inspect", blue))
    assert shown["managed"] is True and shown["labels"] == {"team": "a"}
    assert blue in _ok(netd, "network", "ls", "-q").split()
    files = sorted(os.listdir(netd.conf_dir))
    refused = {
        "exists": ("network", "create", blue),
        "overlaps": ("network", "create", f"red{tag}", "--subnet", blue_subnet),
        "not a host address": (
            "network",
            "create",
            f"red{tag}",
            "--subnet",
            f"{green_prefix}.0/24",
            "--gateway",
            "192.0.2.1",
        ),
        "is not an address": ("run", "--busybox", "--net", blue, "--ip", "x/24", "c0", "true"),
    }
    for why, args in refused.items():
        r = netd.d.cli(*args)
        assert r.returncode == 1 and why.encode() in r.stderr, (why, r.stderr)
    missing = Path(netd.conf_dir, "..", f"missing-{tag}.json").resolve()
    missing.write_text(
        json.dumps(
            {"cniVersion": "1.0.0", "name": f"red{tag}", "plugins": [{"type": "no-such-plugin"}]}
        )
    )
    try:
        r = netd.d.cli("network", "create", f"red{tag}", "--config", str(missing))
        assert r.returncode == 1 and b"no-such-plugin" in r.stderr, r.stderr
    finally:
        missing.unlink()
    assert sorted(os.listdir(netd.conf_dir)) == files  # nothing written by a refusal
    _ok(
        netd,
        "network",
        "create",
        green,
        "--subnet",
        f"{green_prefix}.0/24",
        "--gateway",
        f"{green_prefix}.254",
    )
    _ok(netd, "run", "-d", "--busybox", "--net", blue, "--net", green, "two", "sleep", "600")
    with netd.d.client() as c:
        attached = c.call("attachments.get", {"container_id": "two"})["networks"]
    assert [n["network"] for n in attached] == [blue, green]
    assert attached[0]["addresses"][0].startswith(blue_subnet.rsplit(".", 2)[0])
    assert attached[1]["addresses"][0].startswith(green_prefix)
    assert attached[1]["gateways"] == [f"{green_prefix}.254"]
    bridges = {
        json.loads(_ok(netd, "network", "inspect", n))["plugins"][0]["bridge"]
        for n in (blue, green)
    }
    assert bridges <= _links()
    r = netd.d.cli("network", "rm", blue)
    assert r.returncode == 1 and b"in use by" in r.stderr and b"/two" in r.stderr, r.stderr
    # an attachment is an object with labels, as a snapshot is (a CRI layer keeps its own)
    with netd.d.client() as c:
        made = c.call(
            "attachments.create",
            {"container_id": "labelled", "networks": [green], "labels": {"pod": "p1"}},
        )
        assert made["labels"] == {"pod": "p1"}
        assert c.call("attachments.get", {"container_id": "labelled"})["labels"] == {"pod": "p1"}
        listed = {a["container_id"]: a["labels"] for a in c.call("attachments.list")["attachments"]}
        assert listed == {"two": {}, "labelled": {"pod": "p1"}}
        with pytest.raises(BerthError, match="label"):
            c.call("attachments.create", {"container_id": "bad", "labels": {"": "x"}})
        assert c.call("attachments.delete", {"container_id": "labelled"})["released"] is True
    r = netd.d.cli("network", "rm", "bridge")
    assert r.returncode == 1 and b"default" in r.stderr, r.stderr
    foreign = Path(netd.conf_dir, f"10-hand-{tag}.conflist")
    foreign.write_text(
        json.dumps({"cniVersion": "1.0.0", "name": f"hand{tag}", "plugins": [{"type": "loopback"}]})
    )
    r = netd.d.cli("network", "rm", f"hand{tag}")
    assert r.returncode == 1 and b"did not write" in r.stderr and foreign.exists(), r.stderr
    foreign.unlink()
    netd.d.cli("tasks", "rm", "-f", "two")
    _ok(netd, "containers", "rm", "two")
    assert _ok(netd, "network", "rm", blue, green).split() == [blue, green]
    assert not Path(source).exists() and not bridges & _links()
    r = netd.d.cli("network", "rm", blue)
    assert r.returncode == 1 and b"not found" in r.stderr


def test_networked_containers_through_daemon_kills_leak_nothing(netd: NetDaemon) -> None:
    """Create, start and delete networked containers while berthd is killed (-9) at random
    moments of ADD and DEL: afterwards no address lease, netns pin, veth or NAT rule is
    left, and every container still running has the address its attachment says."""
    import time

    from tests.support.helpers import BERTH

    rng = random.Random(int(os.environ.get("BERTH_CHAOS_SEED", "1414")))
    cycles = int(os.environ.get("BERTH_NET_CHAOS_CYCLES", "300"))
    links_before, netns_before = _links(), _named_netns()
    env = dict(os.environ, BERTH_ADDRESS=netd.d.address, BERTH_NAMESPACE=netd.d.namespace)
    kills = 0

    def maybe_killed(*args: str) -> None:
        """Run a CLI call; in half the cases kill berthd in its middle and start it again."""
        nonlocal kills
        call = subprocess.Popen(
            [BERTH, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.2))
                netd.d.kill9()
                kills += 1
                call.wait(60)
                netd.d.start()
            else:
                call.wait(60)
        finally:
            if call.poll() is None:
                call.kill()
                call.wait(10)

    live: list[str] = []
    for i in range(cycles):
        cid = f"k{i}"
        maybe_killed("run", "-d", "--busybox", "--net", "bridge", cid, "sleep", "600")
        live.append(cid)
        if len(live) > 3 or rng.random() < 0.4:
            gone = live.pop(rng.randrange(len(live)))
            maybe_killed("tasks", "rm", "-f", gone)
            maybe_killed("containers", "rm", gone)
    print(f"\n{cycles} networked containers, {kills} kills of berthd")
    # what survived is consistent: a running container has its attachment and address
    with netd.d.client() as c:
        tasks = {t["id"]: t["status"] for t in c.call("tasks.list")["tasks"]}
        attached = {a["container_id"]: a for a in c.call("attachments.list")["attachments"]}
    for cid, status in tasks.items():
        if status == "running" and cid in attached:
            address = attached[cid]["networks"][0]["addresses"][0].split("/")[0]
            assert address in netd.leases()
    # then everything goes, and nothing is left behind
    containers = [c.split()[0] for c in _ok(netd, "containers", "ls").splitlines()[1:]]
    for cid in containers:
        netd.d.cli("tasks", "rm", "-f", cid)
        _ok(netd, "containers", "rm", cid)
    # A kill between `run`'s attach and its container's creation leaves an attachment for a
    # container that never came: berthd keeps it for a grace period (a client may still be
    # about to create it), then sweeps it; here it is deleted as a client would.
    with netd.d.client() as c:
        for orphan in c.call("attachments.list")["attachments"]:
            assert orphan["container_id"] not in containers, orphan
            c.call("attachments.delete", {"container_id": orphan["container_id"]})
    from tests.support.helpers import wait_until

    wait_until(lambda: netd.leases() == [], what="every address released")
    assert list(Path(netd.d.state, "netns").glob("*")) == []
    assert list(Path(netd.d.state, "networks").glob("*/*.json")) == []
    members = subprocess.run(
        ["ip", "-o", "link", "show", "master", netd.bridge], capture_output=True, text=True
    )
    assert members.stdout.strip() == ""
    assert _nat_rules() <= netd.rules_before
    assert _links() <= links_before | {netd.bridge}  # no veth (nor anything else) left
    assert _named_netns() <= netns_before


def test_what_reconcile_releases_and_what_it_keeps() -> None:
    """The rule berthd applies at start and every minute (service._why_release)."""
    import time

    from berth.daemon.network.service import ORPHAN_GRACE, AttachmentSet, Usage, _why_release

    def usage(exists: bool, exited: bool) -> Usage:
        return Usage(lambda ns, cid: exists, lambda ns, cid: exists and exited)

    def record(**fields: object) -> AttachmentSet:
        attached = AttachmentSet("ns", "c1", "/nonexistent", complete=True)
        attached.saved_at = time.time()
        for key, value in fields.items():
            setattr(attached, key, value)
        return attached

    assert _why_release(record(), usage(True, False)) == ""  # a live task's
    assert _why_release(record(), usage(True, True)) == "its task exited"
    assert _why_release(record(), usage(False, False)) == ""  # its container is coming
    old = time.time() - ORPHAN_GRACE - 1
    assert _why_release(record(saved_at=old), usage(False, False)) == "its container is gone"
    assert _why_release(record(complete=False), usage(True, False)) == "left half-made"
    assert _why_release(record(releasing=True), usage(True, False)).startswith("a release")


def test_a_chosen_subnet_avoids_other_networks_and_the_host_s_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`network create` without --subnet: the first /24 of 10.78/16 that no network and no
    host route covers (/proc/net/route's little-endian hex, as the kernel writes it)."""
    import ipaddress

    from berth.daemon.network import service

    routes = tmp_path / "route"
    routes.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"  # default: ignored
        "br1\t00014E0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 10.78.1.0/24
    )
    found = service.host_routes(str(routes))
    assert found == [ipaddress.IPv4Network("10.78.1.0/24")]
    taken = [ipaddress.ip_network("10.78.0.0/24"), *found]
    monkeypatch.setattr(service, "host_routes", lambda path="": found)
    assert service._choose_subnet("", "", taken[:1]) == "10.78.2.0/24"
    assert service._choose_subnet("10.9.0.0/16", "10.9.3.4", []) == "10.9.0.0/16"
    for subnet, gateway, why in (
        ("10.9.0.0/31", "", "too small"),
        ("10.9.0.1/16", "", "has host bits"),
        ("10.9.0.0/16", "10.10.0.1", "not a host address"),
        ("10.9.0.0/16", "10.9.255.255", "not a host address"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            service._choose_subnet(subnet, gateway, [])


def test_which_published_ports_clash() -> None:
    """A host port is one socket: the same protocol and number clash on the same address,
    or when either side publishes on every address (as Docker decides)."""
    from berth.daemon.network.service import _ports_clash

    clash = [
        (("tcp", 80, ""), ("tcp", 80, "")),
        (("tcp", 80, ""), ("tcp", 80, "127.0.0.1")),
        (("tcp", 80, "0.0.0.0"), ("tcp", 80, "10.0.0.5")),
        (("tcp", 80, "127.0.0.1"), ("tcp", 80, "127.0.0.1")),
    ]
    apart = [
        (("tcp", 80, ""), ("udp", 80, "")),
        (("tcp", 80, ""), ("tcp", 81, "")),
        (("tcp", 80, "127.0.0.1"), ("tcp", 80, "10.0.0.5")),
    ]
    for a, b in clash:
        assert _ports_clash(a, b) and _ports_clash(b, a), (a, b)
    for a, b in apart:
        assert not _ports_clash(a, b) and not _ports_clash(b, a), (a, b)
