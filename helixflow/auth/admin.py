"""``helixflow admin``: manage users, API keys, revocations and signing keys on the database.

The commands open the auth store directly (same `DATABASE_*` and master-key settings as
``helixflow auth``), so they work whether or not the service runs: this is how the first admin
is made. A running service picks their writes up by itself: revocations within about a second
(its store poll; at once over Redis when `REDIS_URL` is set, which these commands publish on),
signing keys within ten seconds.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parser is built on every `helixflow` run: keep its imports light
    from helixflow.auth.core import AuthCore
    from helixflow.auth.revocations import RevocationEvent

__all__ = ["add_admin_arguments", "run_admin"]


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``admin`` sub-commands and their options."""
    parser.add_argument("--database-type", choices=("sqlite", "postgres"),
                        help="default: $DATABASE_TYPE or sqlite")  # fmt: skip
    parser.add_argument("--database-path", help="SQLite file (default: $DATABASE_PATH or "
                        "$HELIXFLOW_HOME/auth.db)")  # fmt: skip
    parser.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    parser.add_argument("--redis-url", help="publish revocations here (default: $REDIS_URL)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print results as JSON")  # fmt: skip
    commands = parser.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    add = functools.partial(commands.add_parser, parents=[common])

    user = add("create-user", help="add a user (prompts for the password)")
    user.add_argument("username")
    user.add_argument("--role", choices=("admin", "user"), default="user")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the password from the first line of stdin")  # fmt: skip

    key = add("create-key", help="make an API key for a user; prints it once")
    key.add_argument("username", help="the owner (username or id)")
    key.add_argument("--name", default="", help="a label for listings")
    key.add_argument("--scope", action="append", dest="scopes", metavar="SCOPE",
                     help="admin, model:* or model:<id>; repeatable (default model:*)")  # fmt: skip
    key.add_argument("--rpm", type=int, help="requests per minute limit")
    key.add_argument("--tpm", type=int, help="tokens per minute limit")
    key.add_argument("--expires-in", type=float, metavar="SECONDS", help="lifetime")

    revoke = add("revoke", help="revoke a jti, family, API key or user")
    revoke.add_argument("kind", choices=("jti", "family", "api_key", "user"))
    revoke.add_argument("value", help="the jti, family id, API key id or username/id")

    add("rotate-keys", help="make a new signing key current")

    add("list-users", help="list every user")
    keys = add("list-keys", help="list a user's API keys")
    keys.add_argument("username")
    disable = add("disable-user", help="disable a user and revoke everything")
    disable.add_argument("username")
    enable = add("enable-user", help="re-enable a disabled user")
    enable.add_argument("username")
    add("gen-master-key", help="print a new master key (base64url)")


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("helixflow admin: error: the passwords differ")
    return first


def _publish(url: str | None, events: list[RevocationEvent | None]) -> None:
    if not url or not events:
        return
    import redis

    from helixflow.auth.service import REDIS_CHANNEL

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        for event in events:
            message = {"origin": "admin", "type": "keys_rotated"}
            if event is not None:
                message.update(type="revocation", event=event.to_json())
            client.publish(REDIS_CHANNEL, json.dumps(message))
        client.close()
    except Exception as exc:  # the service's store poll still picks it up
        print(f"helixflow admin: warning: not published on Redis ({exc})", file=sys.stderr)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def run_admin(args: argparse.Namespace, core: AuthCore, redis_url: str | None) -> int:
    """Run one admin command on `core`; returns the exit code."""
    events: list[RevocationEvent | None] = []  # None: the signing keys changed
    core.add_listener(events.append)
    cmd = args.admin_command
    if cmd == "create-user":
        user = core.create_user(args.username, _password(args), role=args.role)
        _emit(args, {"id": user.id, "username": user.username, "role": user.role},
              f"created {user.role} {user.username} ({user.id})")  # fmt: skip
    elif cmd == "create-key":
        owner = core.get_user(args.username)
        expires = None if args.expires_in is None else time.time() + args.expires_in
        record, key = core.create_api_key(
            owner, name=args.name, scopes=args.scopes or ("model:*",),
            rpm_limit=args.rpm, tpm_limit=args.tpm, expires_at=expires,
        )  # fmt: skip
        _emit(args, {"id": record.id, "prefix": record.prefix, "key": key}, key)
        if not args.json:
            print(f"(key {record.id}, prefix {record.prefix}: shown once, store it now)",
                  file=sys.stderr)  # fmt: skip
    elif cmd == "revoke":
        event = core.revoke(args.kind, args.value)
        _emit(args, {"kind": event.kind, "value": event.value, "revoked_at": event.revoked_at},
              f"revoked {event.kind} {event.value}")  # fmt: skip
    elif cmd == "rotate-keys":
        kid = core.rotate_keys()
        _emit(args, {"kid": kid}, f"signing key {kid} is now current")
    elif cmd == "list-users":
        users = core.list_users()
        rows = [{"id": u.id, "username": u.username, "role": u.role, "disabled": u.disabled}
                for u in users]  # fmt: skip
        _emit(args, rows, "\n".join(
            f"{u.id}  {u.username:<24} {u.role:<6}{'  disabled' if u.disabled else ''}"
            for u in users) or "(no users)")  # fmt: skip
    elif cmd == "list-keys":
        keys = core.store.list_api_keys(core.get_user(args.username).id)
        rows = [{"id": k.id, "prefix": k.prefix, "name": k.name, "scopes": list(k.scopes),
                 "revoked": k.revoked_at is not None, "expires_at": k.expires_at}
                for k in keys]  # fmt: skip
        _emit(args, rows, "\n".join(
            f"{k.id}  hfx_{k.prefix}_...  {k.name or '-':<16} {' '.join(k.scopes)}"
            f"{'  revoked' if k.revoked_at else ''}" for k in keys) or "(no keys)")  # fmt: skip
    elif cmd in ("disable-user", "enable-user"):
        user = core.set_user_disabled(args.username, cmd == "disable-user")
        _emit(args, {"id": user.id, "disabled": user.disabled},
              f"{user.username} {'disabled' if user.disabled else 'enabled'}")  # fmt: skip
    _publish(redis_url, events)
    return 0


def gen_master_key() -> int:
    from helixflow.auth.signing_keys import generate_master_key

    print(generate_master_key())
    return 0
