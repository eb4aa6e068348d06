"""The `local` cloud: every server is a Linux network namespace on one bridge.

- server = network namespace `pgha-<server id>` holding a real PostgreSQL, started by
  the same guest bootstrap an OpenStack VM runs (boot.py);
- management and service ports = veth pairs on the bridge; a service port's guest end
  moves between namespaces bare (its MAC, no address: plumbing.py, over the `ip`
  primitives of netns.py), and the guest's NIC agent configures it, run by the cloud
  where udev would run it in a VM (ports.py, boot.py);
- volume = a directory under `<root>/volumes/<id>` that outlives its server, owned by
  its own OS user `pgha-<volume id>` (users.py), 0700;
- availability zones hold named hosts (hosts.py): a server is placed on one, and a
  host can be powered off (its servers die, links down) and on again;
- the cloud's records live in `<root>/state.json` under flock (records.py), because
  the web and worker processes share them. Root never follows a link below a volume.
"""

from broker.cloud.local.driver import LocalCloud
from broker.cloud.local.netns import namespace_pids
from broker.cloud.local.plumbing import LocalCloudUnavailable

__all__ = ["LocalCloud", "LocalCloudUnavailable", "namespace_pids"]
