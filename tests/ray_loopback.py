"""Ray's own command line (`ray start ...`), kept on the loopback address, for a test cluster
whose nodes all live on this machine.

Ray replaces 127.0.0.1 by the machine's outward address wherever it meets it
(`services.resolve_ip_for_localhost`), and only keeps the loopback address where clusters are
switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), a setting under which `ray start
--address` refuses to join a head. So a head runs as plain `ray start --head` with that
setting, and a second node through this file: the same `ray start` with its node address
pinned to 127.0.0.1 and the setting passed on to the processes it starts (so their own
look-ups give the loopback address too). Nothing else of Ray changes.

    python tests/ray_loopback.py start --block --address 127.0.0.1:PORT ...
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"

if __name__ == "__main__":
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the node's own processes
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True  # this process may join the head
    services.get_node_ip_address = lambda address=None: LOOPBACK
    from ray.scripts.scripts import main

    sys.exit(main())
