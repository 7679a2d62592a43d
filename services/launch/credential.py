"""``megascale credential ROLE --token-file F``: print ROLE's credential file (what a process
of that role needs to prove its role, and nothing more: it cannot derive other roles').

For a deployment that must not hand the cluster token to every pod, e.g. the gateway::

    megascale credential gateway --token-file token | \\
        kubectl create secret generic ms-gateway-credential --from-file=credential=/dev/stdin
"""

from __future__ import annotations

import argparse
import sys

from services.common import auth, rights
from services.common.flags import add_flag
from services.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("credential", help="print one role's credential file")
    p.add_argument("role", choices=rights.ROLES)
    add_flag(p, "--token-file", required=True, help="file holding the cluster token")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    token = auth.load_credential(args.token_file).token
    if token is None:
        raise UserError(f"{args.token_file} holds a role credential, not the cluster token")
    sys.stdout.write(auth.role_credential_file(token, args.role))
    return 0
