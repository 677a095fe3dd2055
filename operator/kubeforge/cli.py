"""The `kubeforge` command: `kubeforge operator`, `kubeforge dev-cluster ...`, `kubeforge crdgen`, ..."""

from __future__ import annotations

import argparse
import sys


def _operator(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubeforge operator", description="Run the kubeforge operator.")
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace (repeatable); default: the whole cluster")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--peering", default=None, metavar="NAME",
                        help="kopf peering name: of several replicas, the one with the highest --priority "
                             "works and the others stand by (default: KUBEFORGE_PEERING; unset: standalone)")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority; default: the start time in ms, so the newest replica (a "
                             "rollout's new pod) takes over and the old one stands by until it exits")
    args = parser.parse_args(argv)
    import asyncio
    import logging

    import kopf

    from kubeforge.controller import (
        handlers,  # noqa: F401  (registers the handlers)
        memory,
    )
    from kubeforge.settings import OperatorSettings

    settings = OperatorSettings()
    memory.limit_arenas(settings.malloc_arenas)  # before kopf starts a thread
    namespaces = args.namespace or settings.namespaces
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per successful handler call drowns what matters
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    peering = args.peering or settings.peering
    peering_args = (
        {"peering_name": peering, "priority": args.priority if args.priority is not None else _start_priority()}
        if peering else {"standalone": True}
    )
    asyncio.run(kopf.operator(
        **peering_args,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    ))
    return 0


def _start_priority() -> int:
    import random
    import time

    return int(time.time() * 1000) * 1000 + random.randrange(1000)  # newest first; ties are unlikely


def _crdgen(argv: list[str]) -> int:
    from kubeforge.api import crdgen

    return crdgen.main(argv)


def _dev_cluster(argv: list[str]) -> int:
    from kubeforge.devcluster import cli

    return cli.main(argv)


def _version(argv: list[str]) -> int:
    from kubeforge import __version__

    print(__version__)
    return 0


COMMANDS = {
    "operator": (_operator, "run the operator (kopf) against the cluster in KUBECONFIG or in-cluster"),
    "dev-cluster": (_dev_cluster, "a local Kubernetes control plane whose pods run as local processes"),
    "crdgen": (_crdgen, "write the CRDs generated from the API models (--check: fail on drift)"),
    "version": (_version, "print the version"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kubeforge <command> [args]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<12} {text}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
