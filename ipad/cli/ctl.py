"""The ``ipadctl`` admin command: inspect the daemon, call modules, follow events.

It uses the blocking client, so it starts without importing trio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ipad._version import __version__
from ipad.cli import ctl_crashes, ctl_events, ctl_logs, ctl_metrics, ctl_module, ctl_session
from ipad.cli.ctl_io import shown
from ipad.client._blocking import BlockingClient
from ipad.client._buffers import make_buffer
from ipad.client._describe import schema_text
from ipad.config.paths import client_socket_path
from ipad.protocol import wire as p
from ipad.protocol.errors import IpadError

#: Exit status when the daemon answered with an error or could not be reached.
EXIT_FAILED = 1
#: Exit status for a usage error (argparse's own).
EXIT_USAGE = 2
#: Exit status when a module ``status`` shows is not running, as systemctl's.
EXIT_NOT_RUNNING = 3
#: Exit status for a module the daemon does not know, as systemctl's for no such unit.
EXIT_NO_SUCH_MODULE = 4


class UsageError(Exception):
    """The command's arguments cannot be used; the message says why."""


#: What each subcommand does, prints and exits with (``ipadctl SUB --help``).
DESCRIPTIONS = {
    "status": (
        "Show the daemon (pid, uptime, clients, proxies) and each module, or only MODULE: "
        "state, seconds in it, worker pid, restarts, proxies, version, and the reason of its "
        "state or of its last failure. Exit status 0 if every module shown is running, 3 if "
        "one is not (starting, backoff, cooldown, failed, stopped...), 4 if MODULE is unknown, "
        "1 if the daemon cannot be reached."
    ),
    "modules": (
        "List the discovered modules with version, enabled, pipelines and manifest path. "
        "Exit status 0, or 1 if the daemon cannot be reached."
    ),
    "describe": (
        "Print a module's methods (parameters, result types, docs) and types. "
        "Exit status 0, 4 if MODULE is unknown, or 1 on another error (no description yet, "
        "daemon unreachable)."
    ),
    "call": (
        "Request a proxy of MODULE, call METHOD once with ARGS (a JSON object) and print "
        "the result (JSON unless it is a string). Exit status 0, 1 if the call or the daemon "
        "failed, 2 if the arguments are not usable, 4 if MODULE is unknown."
    ),
    "restart": (
        "Restart a module's worker now, ending any backoff or cooldown, and wait for the new "
        "start's result; prints 'MODULE: STATE'. Exit status 0 if it runs again, 1 if it did "
        "not start (the failure is printed) or on another error, 4 if MODULE is unknown."
    ),
    "reload": (
        "Re-read the configuration, as SIGHUP does, and print the modules added, removed, "
        "changed and unchanged. Exit status 0, or 1 if the configuration was refused "
        "(its problems are printed)."
    ),
    "stop": (
        "Without MODULE, ask the daemon to stop gracefully; prints 'stopping'. With MODULE, "
        "stop that module's workers until 'ipadctl start MODULE' (or restart): it shows as "
        "stopped, 'stopped by operator', its proxies turn invalid with that reason and calls "
        "on them fail at once; a reload keeps it stopped, a daemon restart starts it. Prints "
        "'MODULE: STATE' once its workers are gone. Exit status 0, 1 if it did not stop or "
        "the daemon cannot be reached, 4 if MODULE is unknown."
    ),
    "start": (
        "Start a module stopped with 'ipadctl stop MODULE' (its proxies recover by "
        "themselves), or one waiting out a backoff or cooldown, and wait for the start's "
        "result; prints 'MODULE: STATE'. A running module is left as it is. Exit status 0 if "
        "it runs, 1 if it did not start (the failure is printed) or on another error, 4 if "
        "MODULE is unknown."
    ),
    "events": (
        "Print the daemon's last N kept events (default 10), or only MODULE's, one a line: "
        "local time (ISO 8601), seq, kind:module and the other fields (--json: one JSON "
        "object a line, `time` in seconds since the epoch); with --follow, new ones too until "
        "interrupted. Exit status 0 (also when ^C or SIGTERM ends --follow), 1 if the daemon "
        "cannot be reached or goes away, 4 if MODULE is unknown."
    ),
    "logs": (
        "Print the daemon's last N log records (default 10), or only those about MODULE; "
        "with --follow, new ones too until interrupted. Under systemd (the daemon logs to "
        "journald) this runs journalctl on the daemon's invocation (and MODULE=), whose exit "
        "status it returns; elsewhere, or with --ring, the records come from the daemon's "
        "in-memory ring of the last 1000 (fields clipped), one a line: local time, level, "
        "event, fields (--json: JSON lines). Admins only. Exit status 0 (also when ^C or "
        "SIGTERM ends --follow), 1 if refused, unreachable or the daemon goes away, 4 if "
        "MODULE is unknown."
    ),
    "session": (
        "Request one proxy of MODULE and run the calls read from stdin on it, one a line: "
        "'METHOD JSON-OBJECT NAME=@FILE...' (the object may be left out: {}; each NAME=@FILE "
        "passes FILE's bytes as the Buffer argument NAME); lines starting with # and "
        "blank lines are skipped. Prints one result a line (--json: each as one JSON line; "
        'an error as {"error": ...}). A failing call prints its error and ends the '
        "session, unless --keep-going. Exit status 0 if every call succeeded, 1 if a call "
        "failed, 2 if a line is not 'METHOD JSON-OBJECT', 4 if MODULE is unknown."
    ),
    "crashes": ctl_crashes.DESCRIPTION,
    "sign": (
        "Sign each module manifest of PATH with an Ed25519 key, writing its signature file "
        "(no daemon needed). Exit status 0, or 1 if any manifest could not be signed."
    ),
    "verify": (
        "Check the signatures of the module manifests of PATH against trusted keys "
        "(no daemon needed); prints ok or REFUSED per module. "
        "Exit status 0, or 1 if any is refused."
    ),
    "keygen": (
        "Make an Ed25519 key pair for signing modules (no daemon needed). "
        "Exit status 0, or 1 if the files cannot be written."
    ),
    "metrics": ctl_metrics.DESCRIPTION,
    "new-module": (
        "Write a new module project into DIR (no daemon needed): a manifest, a module "
        "package with __version__, its tuning file, and tests in-process and under a real "
        "daemon (docs/modules.md). Exit status 0, 1 if DIR is not empty or cannot be "
        "written, 2 if NAME is not a valid module name."
    ),
}

#: The global options' values when given nowhere (they are SUPPRESSed in the parsers, so a
#: value given before the subcommand is not reset by the subcommand's parser).
GLOBAL_DEFAULTS: dict[str, object] = {"socket": None, "json": False, "timeout": 30.0}


def _global_options() -> argparse.ArgumentParser:
    """The options every (sub)command accepts, before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        default=argparse.SUPPRESS,
        help="daemon socket (default: $IPAD_SOCKET, else the per-user or system default)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to wait for an answer (default 30)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The admin command line; the global options go before or after the subcommand."""
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="ipadctl",
        description="Inspect and control a running ipad daemon.",
        epilog="Exit status: 0 success, 1 failure (error reply, daemon unreachable), 2 usage, "
        "3 a module shown by status is not running, 4 no such module.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"ipadctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=DESCRIPTIONS[name], parents=[common]
        )

    status = add("status", "the daemon's and every module's state (exit 3: one not running)")
    status.add_argument("module", nargs="?", help="show only this module")
    add("modules", "discovered modules and their manifests")
    describe = add("describe", "a module's methods: parameters, result types, docs")
    describe.add_argument("module")
    call = add("call", "request a proxy, call one method, print the result")
    call.add_argument("module")
    call.add_argument("method")
    call.add_argument("args", nargs="?", default="{}", help="arguments as a JSON object")
    call.add_argument(
        "--fd",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="pass FILE's bytes (copied into a memfd) as the Buffer argument NAME (repeatable)",
    )
    restart = add("restart", "restart a module's worker now, ending any backoff or cooldown")
    restart.add_argument("module")
    add("reload", "re-read the configuration (like SIGHUP)")
    stop = add("stop", "stop the daemon gracefully, or only MODULE's workers")
    stop.add_argument("module", nargs="?", help="stop only this module (until started again)")
    start = add("start", "start a module stopped with 'stop MODULE'")
    start.add_argument("module")
    ctl_session.add_arguments(add("session", "run calls read from stdin on one proxy"))
    ctl_events.add_arguments(add("events", "recent events; --follow for new ones too"), "events")
    logs = add("logs", "the daemon's recent log records; --follow for new ones too")
    ctl_events.add_arguments(logs, "log records")
    ctl_logs.add_arguments(logs)
    ctl_crashes.add_arguments(add("crashes", "recent worker crashes: reason, method, stack"))
    ctl_metrics.add_parser(add)
    sign = add("sign", "sign the modules of a directory (no daemon needed)")
    sign.add_argument("path", type=Path, help="a module directory, or one manifest")
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")
    verify = add("verify", "check module signatures (no daemon needed)")
    verify.add_argument("path", type=Path, help="a module directory, or one manifest")
    keys = verify.add_mutually_exclusive_group(required=True)
    keys.add_argument("--trusted-key", type=Path, action="append", help="public key (repeatable)")
    keys.add_argument("--config", type=Path, help="use the trusted keys of this configuration")
    keygen = add("keygen", "make an Ed25519 key pair for signing modules")
    keygen.add_argument("private", type=Path, help="private key file to create (mode 0600)")
    keygen.add_argument("public", type=Path, help="public key file to create")
    new_module = add("new-module", "write a new module project with passing tests")
    new_module.add_argument("name", help="module name: letters, digits, '_', '-'")
    new_module.add_argument("directory", type=Path, help="new or empty directory to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ipadctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    if args.command in _OFFLINE:
        return _OFFLINE[args.command](args)
    return _online(args)


def _connect(args: argparse.Namespace) -> BlockingClient | None:
    """Connect, or say why not with the socket actually tried (the default, $IPAD_SOCKET)."""
    path = args.socket or client_socket_path()
    try:
        return BlockingClient(path, name="ipadctl")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        _fail(args, "unreachable", f"no daemon at {path}: {exc.strerror}")
    except PermissionError as exc:
        # The socket's group and mode are the first gate (docs/security.md).
        _fail(args, "permission_denied", f"may not connect to {path}: {exc.strerror}")
    except IpadError as exc:
        _fail(args, exc.code, exc.message, exc.details)
    return None


def _online(args: argparse.Namespace) -> int:
    """Run a command that talks to the daemon."""
    client = _connect(args)
    if client is None:
        return EXIT_FAILED
    try:
        with client:
            return int(_COMMANDS[args.command](client, args))
    except IpadError as exc:
        _fail(args, exc.code, str(exc), exc.details)  # str: a module error says where
        for problem in exc.details.get("problems", []) if not args.json else []:
            print(problem, file=sys.stderr)
        unknown = exc.code == p.ErrorCode.UNKNOWN_MODULE.value  # describe, call...: as status
        return EXIT_NO_SUCH_MODULE if unknown else EXIT_FAILED
    except UsageError as exc:
        _fail(args, "usage", str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader (say, `| head`) left: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _fail(args: argparse.Namespace, code: str, message: str, details: Any = None) -> None:
    if args.json:
        error = {"code": code, "message": message, "details": details or {}}
        print(json.dumps({"error": error}))
    else:
        print(f"ipadctl: {shown(message)}", file=sys.stderr)
        if details and "traceback" in details:
            print(shown(details["traceback"], "\n\t"), file=sys.stderr)


def _print_json(value: object) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True))


def _status(client: BlockingClient, args: argparse.Namespace) -> int:
    reply = client.status()
    modules = reply.modules
    if args.module is not None:
        if args.module not in modules:
            known = ", ".join(sorted(modules)) or "none"
            _fail(args, "unknown_module", f"no module {args.module!r}; modules: {known}")
            return EXIT_NO_SUCH_MODULE
        modules = {args.module: modules[args.module]}
    # As `systemctl status`: 3 when a unit shown is not active (an omitted entry is not shown).
    listed = [m for name, m in modules.items() if name != OMITTED]
    status = 0 if all(m.get("state") == "running" for m in listed) else EXIT_NOT_RUNNING
    if args.json:
        _print_json({"daemon": reply.daemon, "modules": modules})
        return status
    d = reply.daemon
    print(
        f"ipad {d['version']} pid {d['pid']}, up {d['uptime']:.1f}s, {d['clients']} client(s), "
        f"{d['proxies']} proxy(ies), socket {d['socket']}"
    )
    rows: list[tuple[str, ...]] = [
        ("MODULE", "STATE", "PID", "RESTARTS", "PROXIES", "VERSION", "SINCE", "REASON")
    ]
    for name, m in sorted(modules.items()):
        # New columns go before REASON: scripts that split the rows keep their indexes.
        rows.append((name, str(m.get("state", "")), str(m.get("worker_pid") or "-"),
                     str(m.get("restarts", "")), str(m.get("proxies", "")),
                     str(m.get("version", "")), _seconds(m.get("state_seconds")),
                     _reason(m)))  # fmt: skip
        # isolation = "proxy": each proxy's own worker, under its module (a status cut
        # down to fit one packet says how many it left out instead of a list).
        workers = m.get("workers")
        workers = workers if isinstance(workers, list) else []
        for w in workers:
            rows.append((f"  proxy {w['proxy_id']}", w["state"], str(w["worker_pid"] or "-"),
                         str(w["restarts"]), "", "", _seconds(w.get("state_seconds")),
                         _reason(w)))  # fmt: skip
        more = m.get("workers_total", 0) - len(workers)
        if more > 0:
            rows.append((f"  (+{more} more)", "", "", "", "", "", "", ""))
    _print_table(rows)
    return status


#: The entry a STATUS_REPLY cut down to fit one packet counts its left-out modules in.
OMITTED = "\u2026omitted"


def _seconds(value: object) -> str:
    """Seconds as the table shows them: ``12.3s``, ``-`` when unknown."""
    return f"{value:.1f}s" if isinstance(value, int | float) else "-"


def _reason(entry: dict[str, Any]) -> str:
    """The state's reason; when there is none (it recovered), the last failure and its age."""
    if entry.get("reason"):
        return str(entry["reason"])
    last, at = entry.get("last_failure_reason"), entry.get("last_failure_at")
    if not last:
        return ""
    age = f", {max(time.time() - at, 0):.0f}s ago" if isinstance(at, int | float) else ""
    return f"last failure{age}: {last}"


def _modules(client: BlockingClient, args: argparse.Namespace) -> int:
    modules = client.modules()
    if args.json:
        _print_json(modules)
        return 0
    rows: list[tuple[str, ...]] = [("MODULE", "VERSION", "ENABLED", "PIPELINES", "MANIFEST")]
    for name, m in sorted(modules.items()):
        pipe = m["pipeline"]
        handlers = ",".join(pipe["handlers"]) + f" v{pipe['min_version']}-{pipe['max_version']}"
        rows.append((name, m["version"], "yes" if m["enabled"] else "no", handlers, m["manifest"]))
    _print_table(rows)
    return 0


def _describe(client: BlockingClient, args: argparse.Namespace) -> int:
    reply = client.describe(args.module)
    if args.json:
        _print_json(reply)
        return 0
    print(shown(f"{reply.module} {reply.version}: {len(reply.methods)} methods"))
    if reply.note:
        print(f"({shown(reply.note)})")
    for method in reply.methods:
        params = ", ".join(_param_text(prm) for prm in method.params or ())
        result = schema_text(method.result) if method.result is not None else "?"
        marks = [m for m in ("setup" if method.setup else "",
                             f"undoes {method.undoes}" if method.undoes else "") if m]  # fmt: skip
        sig = f"{method.name}({params if method.params is not None else '?'}) -> {result}"
        print("\n  " + shown(sig + (f"  [{', '.join(marks)}]" if marks else "")))
        for line in method.doc.splitlines():  # a module's docstring: shown, never obeyed
            print(f"      {shown(line)}".rstrip())
    if reply.types:
        print("\ntypes:")
    for name, schema in sorted(reply.types.items()):
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict):
            required = set(schema.get("required") or ())
            fields = ", ".join(
                f"{key}{'' if key in required else '?'}: {schema_text(sub)}"
                for key, sub in props.items()
            )
            print(shown(f"  {name} {{{fields}}}"))
        else:
            text = schema_text({k: v for k, v in schema.items() if k != "title"})
            print(shown(f"  {name} = {text}"))
    return 0


def _param_text(param: p.ParamSpec) -> str:
    kind = "Buffer" if param.buffer else schema_text(param.schema)
    default = "" if param.required else f" = {json.dumps(param.default)}"
    return f"{param.name}: {kind}{default}"


def _call(client: BlockingClient, args: argparse.Namespace) -> int:
    try:
        call_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise UsageError(f"arguments are not JSON: {exc}") from None
    if not isinstance(call_args, dict):
        raise UsageError('arguments must be a JSON object, such as \'{"text": "hi"}\'')
    fds: dict[str, int] = {}
    try:
        for spec in args.fd:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--fd takes NAME=FILE, not {spec!r}")
            try:  # its bytes in a memfd: Buffer arguments take nothing else
                fds[name] = make_buffer(Path(path).read_bytes())
            except OSError as exc:
                raise UsageError(f"--fd {name}: cannot open {path}: {exc.strerror}") from None
        proxy = client.request_proxy(args.module)
        result = proxy.call(args.method, call_args, fds, timeout=args.timeout)
        proxy.release()
    finally:
        for fd in fds.values():
            os.close(fd)
    if args.json or not isinstance(result, str):
        _print_json(result)
    else:
        print(shown(result, "\n\t"))  # a module's string: its lines, none of its escapes
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    rows = [[shown(cell) for cell in row] for row in rows]  # versions, reasons: a module's words
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _admin(client: BlockingClient, args: argparse.Namespace) -> int:
    if args.command == "start" or (args.command == "stop" and args.module is not None):
        return ctl_module.module_command(client, args)
    try:
        result = client.admin(args.command, getattr(args, "module", None), timeout=args.timeout)
    except IpadError as exc:
        if exc.code != p.ErrorCode.UNKNOWN_MODULE.value:
            raise
        _fail(args, exc.code, exc.message, exc.details)
        return EXIT_NO_SUCH_MODULE
    if args.json:
        _print_json(result)
    elif args.command == "restart":
        print(f"{result['module']}: {result['state']}")
        if result["state"] != "running":
            why = result.get("reason") or result["state"]
            print(f"ipadctl: {result['module']} did not start: {shown(why)}", file=sys.stderr)
    elif args.command == "reload":
        for key in ("added", "removed", "changed", "code_changed", "unchanged"):
            print(f"{key.replace('_', ' ')}: {', '.join(result.get(key, ())) or '-'}")
    else:
        print("stopping")
    if args.command == "restart" and result.get("state") != "running":
        return EXIT_FAILED  # as `systemctl restart` of a unit that fails to start
    return 0


def _manifests(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.toml") if not p.name.startswith("."))
    return [path]


def _sign(args: argparse.Namespace) -> int:
    from ipad.config.problems import ManifestError  # noqa: PLC0415 - offline commands only
    from ipad.config.signing import SignatureError, sign  # noqa: PLC0415

    status = 0
    for manifest in _manifests(args.path):
        try:
            written = sign(manifest, args.key)
        except (SignatureError, ManifestError, OSError) as exc:
            print(f"ipadctl: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        document = json.loads(written.read_text())
        print(f"{manifest.stem}: signed by {document['key']}, {len(document['files'])} files, "
              f"{written}")  # fmt: skip
    return status


def _verify(args: argparse.Namespace) -> int:
    from ipad.config.manifest import ModuleSource, load_manifest  # noqa: PLC0415 - offline commands only
    from ipad.config.problems import ProblemsError  # noqa: PLC0415
    from ipad.config.signing import SignatureError, load_public_key, verify  # noqa: PLC0415

    try:
        if args.config is not None:
            from ipad.config.loader import load_config  # noqa: PLC0415

            paths = list(load_config(args.config).signatures.trusted_keys)
        else:
            paths = list(args.trusted_key)
        keys = [load_public_key(path) for path in paths]
    except (SignatureError, ProblemsError, OSError) as exc:
        print(f"ipadctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    status = 0
    for manifest in _manifests(args.path):
        try:
            verified = verify(ModuleSource(load_manifest(manifest), manifest), keys)
        except (SignatureError, ProblemsError, OSError) as exc:
            print(f"{manifest.stem}: REFUSED: {exc}")
            status = EXIT_FAILED
            continue
        print(f"{manifest.stem}: ok, signed by {verified.key_id}, {len(verified.files)} files")
    return status


def _keygen(args: argparse.Namespace) -> int:
    from ipad.config.signing import generate_key  # noqa: PLC0415 - offline commands only

    try:
        ident = generate_key(args.private, args.public)
    except OSError as exc:
        print(f"ipadctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{ident}: private key {args.private}, public key {args.public}")
    return 0


def _new_module(args: argparse.Namespace) -> int:
    from ipad.cli.new_module import run  # noqa: PLC0415 - offline commands only

    return run(args)


#: Commands that need no daemon.
_OFFLINE = {"sign": _sign, "verify": _verify, "keygen": _keygen, "new-module": _new_module}

_COMMANDS = {
    "status": _status,
    "modules": _modules,
    "call": _call,
    "describe": _describe,
    "events": ctl_events.events,
    "session": ctl_session.session,
    "logs": ctl_logs.logs,
    "restart": _admin,
    "reload": _admin,
    "stop": _admin,
    "crashes": ctl_crashes.crashes,
    "start": _admin,
    "metrics": ctl_metrics.metrics,
}


if __name__ == "__main__":
    sys.exit(main())
