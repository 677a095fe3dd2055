"""Dump `vllm serve`'s own argument parser (and KVTransferConfig's fields) to JSON, for the render tests.

The operator renders `vllm serve ...` command lines; tests/unit/test_vllm_cli.py checks them against the
parser of the vLLM version the vllm-serve image pins. vLLM is not installable in CI (a CUDA build of several
hundred MB), so its parser is read once, here, from the pinned release's own code:

    pip download --no-deps vllm==<VLLM_VERSION> -d /tmp/vllm
    unzip -q /tmp/vllm/vllm-*.whl 'vllm/*' -d /tmp/vllm/src
    # plus the few pure-Python modules its CLI imports (cbor2, gguf, psutil, pyzmq, msgspec, ...), --no-deps
    PYTHONPATH=/tmp/vllm/src python scripts/vllm_cli_spec.py > tests/data/vllm-serve-<VLLM_VERSION>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import typing


def _literal_values(tp: object) -> list[str] | None:
    """The allowed values of a Literal (also inside Optional/Union), else None (any value of its type)."""
    if typing.get_origin(tp) is typing.Literal:
        return sorted(map(str, typing.get_args(tp)))
    values = [v for arg in typing.get_args(tp) if (v := _literal_values(arg)) is not None]
    return sorted({x for v in values for x in v}) if values else None


def main() -> int:
    import os

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs to stdout; stdout is the JSON
    import vllm
    import vllm.platforms

    # no GPU where this runs: the CPU platform lets the parser compute its defaults (option names and
    # choices do not depend on the platform)
    vllm.platforms.vllm_version_matches_substr = lambda sub: sub == "cpu"
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    options = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        options.append({
            "options": sorted(action.option_strings),
            "dest": action.dest,
            "nargs": action.nargs if isinstance(action.nargs, (int, str, type(None))) else str(action.nargs),
            "takes_value": action.nargs != 0,
            "choices": sorted(map(str, action.choices)) if action.choices else None,
        })
    kv_fields = {}
    hints = typing.get_type_hints(KVTransferConfig)
    for name in KVTransferConfig.__dataclass_fields__:
        kv_fields[name] = _literal_values(hints[name])
    json.dump({"version": vllm.__version__, "serve_options": sorted(options, key=lambda o: o["dest"]),
               "kv_transfer_config_fields": kv_fields,
               "kv_connectors": sorted(KVConnectorFactory._registry)}, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
