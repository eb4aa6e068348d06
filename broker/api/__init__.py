"""The Open Service Broker API: openbrokerapi's blueprint plus hooks that close its gaps."""

from broker.api.app import create_app

__all__ = ["create_app"]
