"""The OpenStack cloud driver (openstacksdk). See docs/openstack.md."""

from broker.cloud.openstack.calls import reporting
from broker.cloud.openstack.driver import OpenStackCloud
from broker.cloud.openstack.fencing import TransientFenceError
from broker.cloud.openstack.options import OpenStackOptions
from broker.cloud.openstack.resources import TAG_PLAN

__all__ = ["TAG_PLAN", "OpenStackCloud", "OpenStackOptions", "TransientFenceError",
           "reporting"]
