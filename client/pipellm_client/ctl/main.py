"""`pipellmctl [--socket PATH] [--timeout S] VERB ...`: the command line, and failures -> exit codes.

Verbs live one per module (status, sessions, watch, health); this file only parses, connects, and maps
what went wrong to the codes in `exitcodes.py`, so every verb fails the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import grpc

from .. import Client, DaemonError, DaemonUnavailable, PipeLLMError, default_socket
from ..wire import DEFAULT_SOCKET, data_socket_path
from .base import NoAnswer, Verb
from .exitcodes import DESCRIPTION, Exit
from .health import VERB as HEALTH
from .sessions import VERB as SESSIONS
from .status import VERB as STATUS
from .watch import VERB as WATCH

VERBS: tuple[Verb, ...] = (STATUS, SESSIONS, WATCH, HEALTH)
DEFAULT_TIMEOUT_S = 10.0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given after the verb overrides the global one, an absent one leaves it alone.
    common.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p = argparse.ArgumentParser(
        prog="pipellmctl",
        description="Inspect a running pipellmd: status, sessions, events and health.",
        epilog=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--socket",
        default=default_socket(),
        help=f"pipellmd control socket (default: $PIPELLM_SOCKET, else {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for an answer before giving up with exit 3 (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument("--version", action="version", version=f"pipellmctl {_version()}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        vp = sub.add_parser(verb.name, help=verb.help, description=verb.help, parents=[common])
        verb.configure(vp)
    return p


def _version() -> str:
    from .. import __version__

    return __version__


def fail(code: Exit, message: str) -> int:
    print(f"pipellmctl: {message}", file=sys.stderr)
    return int(code)


def _denied_locally(socket_path: str) -> bool:
    """The socket exists but this user may not connect to it (file mode/group), before the daemon sees us."""
    data = data_socket_path(socket_path)
    return os.path.exists(data) and not os.access(data, os.R_OK | os.W_OK)


def classify(exc: BaseException, socket_path: str) -> int:
    """One mapping from what went wrong to an exit status, for every verb."""
    if isinstance(exc, NoAnswer):
        return fail(Exit.UNREACHABLE, f"pipellmd at {socket_path} gave no answer: {exc}")
    if isinstance(exc, DaemonUnavailable):
        if _denied_locally(socket_path):
            return fail(
                Exit.DENIED,
                f"permission denied on {socket_path}.data: this user needs to be in the socket's group "
                "(the daemon's socket_mode is 0660 by default)",
            )
        return fail(Exit.UNREACHABLE, str(exc))
    if isinstance(exc, DaemonError):
        if exc.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return fail(Exit.DENIED, f"pipellmd refused this user: {exc.details}")
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return fail(Exit.UNREACHABLE, f"pipellmd at {socket_path}: {exc.details or exc.code.name}")
        return fail(Exit.ERROR, str(exc))
    if isinstance(exc, PipeLLMError):
        return fail(Exit.ERROR, str(exc))
    raise exc


def off_main_thread(run: Callable[[], int]) -> int:
    """Run a verb on a worker thread and wait for it here.

    Python raises Ctrl-C's KeyboardInterrupt on the main thread, wherever it happens to be. Inside grpc's
    own Python code (setting up or reading a call) it leaves the channel's bookkeeping half done, and
    closing that channel then waits forever. Waiting here, the interrupt lands in `join`; closing the
    channel afterwards cancels the worker's call cleanly.
    """
    outcome: list[int] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(run())
        except BaseException as exc:  # handed to the main thread, which classifies it
            failure.append(exc)

    worker = threading.Thread(target=target, name="pipellmctl-verb", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failure:
        raise failure[0]
    return outcome[0]


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C ends `watch` even when started with SIGINT ignored (a shell's background job, a parent that
    # ignores it): Python leaves an inherited SIG_IGN in place, and then nothing would stop the stream.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = parser()
    args = p.parse_args(argv)  # exits 2 on bad usage
    if args.verb is None:
        p.print_usage(sys.stderr)
        return fail(Exit.USAGE, "a verb is required: " + ", ".join(v.name for v in VERBS))
    if args.timeout <= 0:
        return fail(Exit.USAGE, "--timeout must be > 0")
    verb = next(v for v in VERBS if v.name == args.verb)
    client = Client(args.socket, timeout=args.timeout)
    try:
        return off_main_thread(lambda: verb.run(client, args))
    except KeyboardInterrupt:
        return int(Exit.OK)  # Ctrl-C is how `watch` is meant to end; finally closes (cancels) the stream
    except BrokenPipeError:
        # `pipellmctl watch | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(Exit.OK)
    except (NoAnswer, PipeLLMError) as exc:
        return classify(exc, args.socket)
    except grpc.RpcError as exc:  # the SDK maps these; this is a safety net
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return classify(DaemonError(code, details or ""), args.socket)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
