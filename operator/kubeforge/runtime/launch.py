"""torchrun that keeps the runtime's exit codes: `python -m kubeforge.runtime.launch <torchrun args>`.

torchrun (torch.distributed.run) exits 1 whenever a worker fails and when it is itself stopped by SIGTERM,
so the codes the operator interprets (contract.EXIT_INVALID_SPEC, contract.EXIT_PREEMPTED) would be lost
if the pod's command were plain torchrun. This wrapper runs the very same launcher in-process
(`torch.distributed.run.run`, same arguments) and maps the outcome:

- a worker exited 78 (invalid spec)                 -> 78
- a worker exited 143, or the launcher got SIGTERM  -> 143 (workers were forwarded the signal and
                                                       checkpoint before exiting; see --shutdown-timeout)
- any other worker failure                          -> 1
"""

from __future__ import annotations

import logging
import sys

from .. import contract

log = logging.getLogger(__name__)


def exit_code_for(worker_codes: list[int]) -> int:
    if contract.EXIT_INVALID_SPEC in worker_codes:
        return contract.EXIT_INVALID_SPEC
    if contract.EXIT_PREEMPTED in worker_codes:
        return contract.EXIT_PREEMPTED
    return 1 if worker_codes else contract.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
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
