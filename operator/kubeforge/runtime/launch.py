"""torchrun that keeps the runtime's exit codes: `python -m kubeforge.runtime.launch <torchrun args>`.

torchrun (torch.distributed.run) exits 1 whenever a worker fails and when it is itself stopped by SIGTERM,
so the codes the operator interprets (contract.EXIT_INVALID_SPEC, contract.EXIT_PREEMPTED) would be lost
if the pod's command were plain torchrun. This wrapper runs the very same launcher in-process
(`torch.distributed.run.run`, same arguments) and maps the outcome:

- a worker exited 78 (invalid spec)                 -> 78
- a worker exited 143, or the launcher got SIGTERM  -> 143 (workers were forwarded the signal and
                                                       checkpoint before exiting; see --shutdown-timeout)
- any other worker failure                          -> 1

It also raises torchrun's grace for workers after SIGTERM from 30 s to an hour (TORCH_ELASTIC_SHUTDOWN_TIMEOUT
or --shutdown-timeout override it), so the pod's terminationGracePeriodSeconds is what bounds the checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from .. import contract

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 3600


def exit_code_for(worker_codes: list[int]) -> int:
    if contract.EXIT_INVALID_SPEC in worker_codes:
        return contract.EXIT_INVALID_SPEC
    if contract.EXIT_PREEMPTED in worker_codes:
        return contract.EXIT_PREEMPTED
    return 1 if worker_codes else contract.EXIT_OK


def resolve_master_addr(host: str, timeout_s: float = 600.0) -> str:
    """Rank 0's address, resolved here in Python and passed on as an IP.

    Rank 0's DNS record appears only once its pod has an IP, so other ranks wait for it with backoff instead
    of failing. Resolving in Python also lets the dev cluster's name shim (which patches Python's resolver,
    not libc's) serve the C++ TCPStore client; in a real cluster it is plain cluster DNS either way.
    """
    import ipaddress
    import socket
    import time

    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
        except socket.gaierror as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"cannot resolve rendezvous host {host}: {exc}") from exc
            log.info("waiting for %s to resolve (%s)", host, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def start_heartbeat(node_rank: int) -> None:
    """Rank 0's pod beats for scripts that report no progress (see kubeforge.runtime.heartbeat)."""
    seconds = os.environ.get(contract.ENV_HEARTBEAT_SECONDS)
    if node_rank != 0 or not seconds:
        return
    from .heartbeat import Heartbeat, annotate_own_pod

    try:
        send = annotate_own_pod()
    except Exception as exc:  # noqa: BLE001 - liveness reporting never stops training
        log.warning("heartbeat off: %s", exc)
        return
    if send is not None:
        Heartbeat(send, float(seconds)).start()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun SIGKILLs workers 30 s after forwarding SIGTERM unless told otherwise; a checkpoint can take
    # longer. Wait as long as the pod's grace period allows (the kubelet's SIGKILL bounds it anyway).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S))
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.master_addr = resolve_master_addr(args.master_addr)
    start_heartbeat(args.node_rank)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = exit_code_for(codes)
        log.error("workers failed with exit codes %s; exiting %d", codes, code)
        return code
    except SignalException as exc:
        log.warning("launcher stopped by %s; workers were asked to checkpoint", exc.sigval.name)
        return contract.EXIT_PREEMPTED
    return contract.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
