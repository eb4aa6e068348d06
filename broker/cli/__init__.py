"""The command line: `python -m broker <command>` (also installed as `broker`).

serve     API + operation worker + monitor in one process (the embedded default)
web       the API alone, under gunicorn (production)
worker    the operation worker and the monitor (production)
db upgrade                      bring the state store's schema up to date
instances list | show ID [--json] | switchover ID | rotate-certs ID
backups list [ID] [--json] | delete ID [--yes]
cloud check | orphans [--delete] [--yes]
"""

from __future__ import annotations

import argparse
import logging
import sys

import sqlalchemy.exc

from broker.config import ConfigError, load_settings
from broker.logs import redact, setup_logging

log = logging.getLogger("broker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="API, worker and monitor in one process (embedded default)")
    sub.add_parser("web", help="the OSB API under gunicorn")
    sub.add_parser("worker", help="the operation worker and the monitor")

    db = sub.add_parser("db", help="state store schema")
    db.add_argument("action", choices=["upgrade"])

    inst = sub.add_parser("instances", help="what the broker runs")
    isub = inst.add_subparsers(dest="action", required=True, metavar="ACTION")
    isub.add_parser("list", help="every live instance, one line each")
    show = isub.add_parser("show", help="one instance: nodes, replication, history")
    show.add_argument("instance_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    sw = isub.add_parser("switchover", help="planned switchover to the standby")
    sw.add_argument("instance_id")
    rot = isub.add_parser("rotate-certs", help="new TLS certificates for every node (and a "
                                               "CA for an instance made before TLS)")
    rot.add_argument("instance_id")

    backups = sub.add_parser("backups", help="backups and restore windows")
    bsub = backups.add_subparsers(dest="action", required=True, metavar="ACTION")
    blist = bsub.add_parser("list", help="backups, restorable window and archiving lag "
                                         "(deleted instances included)")
    blist.add_argument("instance_id", nargs="?")
    blist.add_argument("--json", action="store_true", help="machine-readable output")
    bdel = bsub.add_parser("delete", help="purge a deleted instance's backups now (asks first)")
    bdel.add_argument("instance_id")
    bdel.add_argument("--yes", action="store_true", help="do not ask")

    cloud = sub.add_parser("cloud", help="the cloud behind the broker")
    csub = cloud.add_subparsers(dest="action", required=True, metavar="ACTION")
    csub.add_parser("check", help="validate credentials and every plan's cloud settings")
    orphans = csub.add_parser("orphans", help="resources tagged as the broker's with no instance")
    orphans.add_argument("--delete", action="store_true", help="delete them (asks first)")
    orphans.add_argument("--yes", action="store_true", help="do not ask")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Operator commands read the store; they do not need the API credentials.
    needs_auth = args.command in ("serve", "web")
    try:
        settings = load_settings(require_auth=needs_auth)
        setup_logging(settings.log_level)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except sqlalchemy.exc.OperationalError as exc:
        # An unreachable or broken state store: say so in one line, no traceback.
        print(f"broker: the state store failed: {redact(str(exc.orig)).strip()}",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: object) -> int:
    from broker.config import Settings

    assert isinstance(settings, Settings)
    if args.command == "serve":
        from broker.cli.serve import serve

        return serve(settings)
    if args.command == "web":
        from broker.cli.serve import web

        return web(settings)
    if args.command == "worker":
        from broker.cli.serve import worker

        return worker(settings)

    from broker.runtime import build_runtime

    if args.command == "db":
        runtime = build_runtime(settings, upgrade=False)
        runtime.store.upgrade()
        print("state store schema is up to date")
        return 0
    runtime = build_runtime(settings)
    if args.command == "instances":
        from broker.cli import instances

        if args.action == "list":
            return instances.list_instances(runtime)
        if args.action == "show":
            return instances.show_instance(runtime, args.instance_id, args.json)
        if args.action == "rotate-certs":
            return instances.rotate_certs(runtime, args.instance_id)
        return instances.switchover(runtime, args.instance_id)
    if args.command == "backups":
        from broker.cli import backups

        if args.action == "list":
            return backups.list_backups(runtime, args.instance_id, args.json)
        return backups.delete_backups(runtime, args.instance_id, assume_yes=args.yes)
    if args.command == "cloud":
        from broker.cli import cloud

        if args.action == "check":
            return cloud.check(runtime)
        return cloud.orphans(runtime, delete=args.delete, assume_yes=args.yes)
    raise AssertionError(args.command)
