"""Links berth itself changes, over netlink (pyroute2), never by running `ip`.

The CNI plugins make and remove what a container's attachment needs (veths, addresses,
rules); the one link left to the runtime is a bridge the bridge plugin created for a
network that is then removed (DEL of the last container leaves the bridge, by design).
pyroute2's IPRoute speaks netlink on a socket in the calling thread: no fork, no helper
process; its calls block, so berthd runs them in a worker thread.
"""

from __future__ import annotations

import logging

log = logging.getLogger("berthd.network")


def delete(name: str) -> bool:
    """Delete the link `name` in berthd's own network namespace; False if it is not there."""
    from pyroute2 import IPRoute  # imported on use: ~10 ms and a few MiB berthd rarely needs
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: gone meanwhile
                return False
            raise
        log.info("network: link %s deleted", name)
        return True
