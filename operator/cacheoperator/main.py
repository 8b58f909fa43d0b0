"""`cacheoperator`: run the CacheCluster operator (kopf) with production settings.

Run exactly one replica (a Deployment with strategy Recreate, so an upgrade never overlaps
two). kopf peering is the safety net, not a lock: operators sharing a peering object write
keep-alives into it; one that sees a live peer of higher priority pauses, and peers of equal
priority all pause (with a warning) until only one is left. It is not leader election:
there is no lease, no per-object lock and no hand-over, and two operators started at the
same moment both act until they have seen each other's first keep-alive.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kopf

from cacheoperator import __version__, handlers
from cacheoperator.appliances import DEFAULT_TIMEOUT, ApplianceReports
from cacheoperator.kube import connect
from cacheoperator.metrics import OperatorMetrics
from cacheoperator.naming import DEFAULT_IMAGE
from cacheoperator.reconcile import WORKERS, ClusterController

DEFAULT_PEERING = "cache-operator"
DEFAULT_METRICS_PORT = 9160


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cacheoperator",
        description="Run cache appliances described by CacheCluster resources.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeat for more; kopf globs such as 'cache-*' work)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=os.environ.get("CACHEOPERATOR_PEERING", DEFAULT_PEERING),
        metavar="NAME",
        help=(
            "kopf peering object (ClusterKopfPeering with -A, KopfPeering per namespace "
            "with -n); it must exist (default: %(default)s)"
        ),
    )
    peering.add_argument("--standalone", action="store_true", help="no peering (development only)")
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="peering priority: an operator pauses while one with a higher priority runs",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("CACHEOPERATOR_LIVENESS") or None,
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("CACHEOPERATOR_METRICS_PORT", DEFAULT_METRICS_PORT)),
        help="port of the operator's Prometheus /metrics, 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-address",
        default=os.environ.get("CACHEOPERATOR_METRICS_ADDRESS", "0.0.0.0"),
        metavar="ADDRESS",
        help="address of the operator's /metrics (default: %(default)s, every interface)",
    )
    parser.add_argument(
        "--default-image",
        default=os.environ.get("CACHEOPERATOR_IMAGE", DEFAULT_IMAGE),
        help="server image for clusters that name none (default: %(default)s)",
    )
    parser.add_argument(
        "--report-timeout",
        type=float,
        default=float(os.environ.get("CACHEOPERATOR_REPORT_TIMEOUT", DEFAULT_TIMEOUT)),
        metavar="SECONDS",
        help=(
            "time for one read of an appliance's report (its CPUs and memory limit from "
            "stats settings, its warm restart from stats); 0 reads none (default: %(default)s)"
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port: {args.metrics_port} is not a port (0 to 65535)")
    if not 0 <= args.report_timeout <= 60:
        parser.error(f"--report-timeout: {args.report_timeout} is not 0 to 60 seconds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    if not args.verbose:
        # kopf logs every handled pod and StatefulSet event ("Handler ... succeeded");
        # what matters to people is in the Events and the status. Failures still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    log = logging.getLogger("cacheoperator")

    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
        log.info("operator metrics on %s:%d/metrics", args.metrics_address, args.metrics_port)
    reports = ApplianceReports(timeout=args.report_timeout) if args.report_timeout else None
    controller = ClusterController(
        connect(connections=WORKERS),
        args.default_image,
        post_event=handlers.post_event,
        metrics=metrics,
        reports=reports,
    )
    if reports is not None:
        # Once an appliance's report is in, one more pass puts it into the status.
        reports.notify = controller.reconcile
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    kopf.run(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True if args.standalone else None,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(controller=controller),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
