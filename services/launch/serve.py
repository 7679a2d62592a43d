"""``megascale serve ROLE``: run one role as a process (what the launcher and Helm chart do).

Each role package has a ``main`` module with ``add_arguments(parser)``, ``build(args) ->
config`` and ``async serve(config, ready_file, stop)``. Flags can come from the environment
(:mod:`services.common.flags`). SIGTERM and SIGINT stop the role cleanly (servers drained,
libm2n links closed, shared memory unlinked).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys

from services.common import auth
from services.errors import UserError

ROLES: dict[str, tuple[str, str]] = {
    "attention": ("services.attention.main", "an attention replica"),
    "expert": ("services.expert.main", "an expert node"),
    "scheduler": ("services.scheduler.main",
                  "the scheduler (membership, placement, replica picking)"),
    "gateway": ("services.gateway.main", "the OpenAI-compatible gateway"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run one role: " + " | ".join(ROLES))
    roles = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    wanted = next((a for a in sys.argv[2:] if a in ROLES), None)
    for name, (module, help_text) in ROLES.items():
        rp = roles.add_parser(name, help=help_text)
        if wanted in (None, name):  # import only the role being started
            importlib.import_module(module).add_arguments(rp)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    main = importlib.import_module(ROLES[args.role][0])
    auth.configure(auth.load_credential(args.cluster_token_file), args.role,
                   auth.TlsFiles.load(args.tls_cert_file, args.tls_key_file, args.tls_ca_file))
    config = main.build(args)
    return asyncio.run(_run(main.serve, config, args.ready_file))


async def _run(serve, config, ready_file: str | None) -> int:  # noqa: ANN001
    import libm2n

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(config, ready_file, stop)
    except libm2n.InvalidArgument as exc:  # a bad --m2n-url and the like
        raise UserError(str(exc)) from None
    return 0
