"""What the ``meshllm`` command line accepts: value types that refuse bad input at parse time
(one line on stderr, exit status 2, as argparse does for any usage error), and the options
every command shares, resolved from flags, then the environment, then the defaults.

The environment is read here and nowhere else in the CLI: ``MESHLLM_TARGET``,
``MESHLLM_API_KEY`` / ``MESHLLM_API_KEY_FILE``, ``MESHLLM_TLS_CA``, ``MESHLLM_TLS_CERT``,
``MESHLLM_TLS_KEY``. A key given as a flag or variable beats one given as a file of the same
level; a flag beats any variable.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from meshllm.api.errors import MeshError
from meshllm.api.tls import ChannelTLS

DEFAULT_TARGET = "localhost:50051"
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class UsageError(Exception):
    """A bad option found after parsing (a key file that cannot be read): exit status 2."""


def distribution_version(name: str) -> str:
    """``--version``'s text: the installed distribution's version."""
    try:
        return version(name)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            within = f"at least {low}" if high is None else f"within {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {within}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


def number(
    low: float, *, above: bool = False, high: float | None = None, below: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (> low with ``above``), <= high (< with
    ``below``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if above else value < low
        too_high = high is not None and (value >= high if below else value > high)
        if not math.isfinite(value) or too_low or too_high:
            rule = f"{'above' if above else 'at least'} {low:g}"
            if high is not None:
                rule += f" and {'below' if below else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {rule}")
        return value

    parse.__name__ = "number"
    return parse


def readable_file(text: str) -> Path:
    """An argparse type: a file that exists and can be read."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be read (permission denied)")
    return path


def levels(text: str) -> tuple[int, ...]:
    """An argparse type: concurrency levels such as ``1,8,64`` (sorted, each >= 1)."""
    try:
        values = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        values = set()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers >= 1, such as 1,8,64")
    return tuple(sorted(values))


def add_key_options(p: argparse.ArgumentParser, *, default: object) -> None:
    g = p.add_argument_group("API key (a flag, else MESHLLM_API_KEY or MESHLLM_API_KEY_FILE)")
    keys = g.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        default=default,
        help="the key itself (visible in ps and shell history: prefer the file or variable)",
    )
    keys.add_argument(
        "--api-key-file", default=default, metavar="PATH", help="a file holding the key"
    )


def add_connection_options(p: argparse.ArgumentParser, *, default: object) -> None:
    """The options every client command shares; ``default=argparse.SUPPRESS`` on a subcommand
    so that the same flags are accepted after it (``meshllm models --target X``) without a
    subcommand's absent flag hiding one given before it."""
    p.add_argument(
        "--target",
        default=default,
        help=f"router or replica host:port (MESHLLM_TARGET; default {DEFAULT_TARGET})",
    )
    add_key_options(p, default=default)
    p.add_argument(
        "--timeout",
        type=number(0, above=True),
        default=default,
        help="deadline per call, seconds",
    )
    g = p.add_argument_group("TLS", "default: plaintext, for local development only")
    g.add_argument(
        "--tls",
        action="store_true",
        default=default,
        help="TLS trusting the system's root certificates",
    )
    g.add_argument(
        "--tls-ca", default=default, metavar="PEM", help="TLS trusting this CA (MESHLLM_TLS_CA)"
    )
    g.add_argument(
        "--tls-cert",
        default=default,
        metavar="PEM",
        help="client certificate, for mutual TLS (with --tls-key; MESHLLM_TLS_CERT)",
    )
    g.add_argument(
        "--tls-key",
        default=default,
        metavar="PEM",
        help="private key of --tls-cert (MESHLLM_TLS_KEY)",
    )


@dataclass(frozen=True, kw_only=True)
class Connection:
    """Where and how the CLI connects, after flags, environment and defaults."""

    target: str
    api_key: str | None
    timeout: float | None
    tls: ChannelTLS | None


def _given(args: argparse.Namespace, name: str) -> object:
    return getattr(args, name, None)


def api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """``--api-key``, ``--api-key-file``, ``MESHLLM_API_KEY``, ``MESHLLM_API_KEY_FILE``: the
    first one set."""
    if (key := _given(args, "api_key")) is not None:
        return str(key)
    if (path := _given(args, "api_key_file")) is not None:
        return read_key_file(str(path), "--api-key-file")
    if key := environ.get("MESHLLM_API_KEY"):
        return key
    if path := environ.get("MESHLLM_API_KEY_FILE"):
        return read_key_file(path, "MESHLLM_API_KEY_FILE")
    return None


def read_key_file(path: str, what: str) -> str:
    """The key in ``path``: its first line, without surrounding white space."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UsageError(f"{what}: cannot read {path}: {reason}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise UsageError(f"{what}: {path} is empty")
    return key


def connection(args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    """The connection settings: each flag given, else its variable, else the default."""

    def pick(name: str, variable: str) -> str:
        return str(_given(args, name) or environ.get(variable, ""))

    ca, cert, key = (pick(f"tls_{n}", f"MESHLLM_TLS_{n.upper()}") for n in ("ca", "cert", "key"))
    tls = None
    if _given(args, "tls") or ca or cert or key:  # any TLS setting turns TLS on
        try:
            tls = ChannelTLS(ca=ca, cert=cert, key=key)
        except MeshError as e:  # names the setting: tls_ca, tls_cert, tls_key
            raise UsageError(e.message) from None
    timeout = _given(args, "timeout")
    return Connection(
        target=pick("target", "MESHLLM_TARGET") or DEFAULT_TARGET,
        api_key=api_key(args, environ),
        timeout=float(timeout) if isinstance(timeout, float) else None,
        tls=tls,
    )
