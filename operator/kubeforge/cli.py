"""The `kubeforge` command: `kubeforge operator`, `kubeforge dev-cluster ...`, `kubeforge crdgen`, ..."""

from __future__ import annotations

import argparse
import sys


def _operator(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubeforge operator", description="Run the kubeforge operator.")
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only this namespace (repeatable); default: the whole cluster")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--standalone", action="store_true", default=True,
                        help="no peering between operator replicas (one active replica; the chart runs one)")
    args = parser.parse_args(argv)
    import asyncio
    import logging

    import kopf

    from kubeforge.controller import handlers  # noqa: F401  (registers the handlers)
    from kubeforge.settings import OperatorSettings

    settings = OperatorSettings()
    namespaces = args.namespace or settings.namespaces
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per successful handler call drowns what matters
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    asyncio.run(kopf.operator(
        standalone=args.standalone,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
    ))
    return 0


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
