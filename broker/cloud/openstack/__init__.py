"""The OpenStack cloud driver (openstacksdk). See docs/openstack.md."""

from broker.cloud.base import TAG_PLAN
from broker.cloud.openstack.calls import reporting
from broker.cloud.openstack.driver import OpenStackCloud
from broker.cloud.openstack.fencing import TransientFenceError
from broker.cloud.openstack.options import OpenStackOptions

__all__ = ["TAG_PLAN", "OpenStackCloud", "OpenStackOptions", "TransientFenceError",
           "reporting"]
