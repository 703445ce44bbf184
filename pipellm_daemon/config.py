"""pipellmd settings: documented defaults, overridden by a TOML file, then PIPELLM_* env, then flags.

Every setting is listed in `SETTINGS` with its type and meaning; deploy/pipellmd.toml is the annotated
example and a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pipellm_client.channel import DEFAULT_IV_ROTATION_REMAINING, DEFAULT_UPPER
from pipellm_client.wire import DEFAULT_SOCKET, MODE_NAMES, data_socket_path

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


_COUNT_LIMITS: Final = (
    "max_connections",
    "max_connections_per_uid",
    "max_sessions_per_uid",
    "max_regions_per_uid",
    "max_region_bytes_per_uid",
    "max_inflight_bytes_per_uid",
    "max_queued_commits",
    "max_watches_per_uid",
)


class ConfigError(ValueError):
    """A setting with a bad value, an unknown name or an unreadable file; the message names it."""


@dataclass(frozen=True)
class Config:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    mode: str = "pipellm"
    workers: int = 0  # 0 = one per usable core; naive mode always uses one
    chunk_size: int = 1 << 20
    h2d_slots: int = 32  # per session: bounce slots for H2D ciphertext
    d2h_slots: int = 16
    demand_slots: int = 4  # H2D slots speculation leaves free for on-demand encryption
    pool_bytes: int = 4 << 30  # all arenas together; sessions beyond it get RESOURCE_EXHAUSTED
    max_sessions: int = 64
    max_regions: int = 4096  # per session
    max_region_bytes: int = 1 << 40
    max_intents: int = 1 << 16  # pending per session
    max_transfers_per_commit: int = 4096
    small_transfer_threshold: int = 256 << 10
    channels: int = 2  # copy engines per session: speculative stream + small/unpredicted
    max_depth: int = 16  # chunks encrypted ahead per session
    ahead_bytes: int = 64 << 20  # byte budget for encrypted-ahead ciphertext per session
    fingerprint: bool = False  # xxhash mutable chunks at encryption and at commit
    delivery_ring: bool = True  # publish ready ciphertext in a ring the SDK takes hits from (no round trip)
    sched_batch: bool = True  # SCHED_BATCH (at start): waking the daemon never preempts the serving process
    generation_granule: int = 64 << 10
    key_usage_upper: int = DEFAULT_UPPER
    key_usage_lower: int = 0  # 0 = upper - 1e9 (or upper/2 when upper is small)
    iv_rotation_remaining: int = DEFAULT_IV_ROTATION_REMAINING
    allowed_uids: tuple[int, ...] = ()  # empty = the daemon's own uid (root always allowed)
    allowed_gids: tuple[int, ...] = ()
    admin_uids: tuple[int, ...] = (0,)  # see every tenant's sessions and events (the daemon's own uid always does)
    # Per-uid quotas, so one tenant cannot take every fd, session or byte of the daemon; each refusal is
    # RESOURCE_EXHAUSTED naming the setting.
    max_connections: int = 1024  # data-plane connections, all uids together (each is one fd)
    max_connections_per_uid: int = 64  # a session uses one, each Client one more for its control calls
    connect_rate_per_uid: float = 100.0  # key agreements (P-384 keygen) per second per uid; more wait
    max_sessions_per_uid: int = 32
    max_regions_per_uid: int = 8192  # each region is one memfd the daemon keeps open
    max_region_bytes_per_uid: int = 1 << 40
    max_inflight_bytes_per_uid: int = 64 << 30  # bytes of commits queued or in progress
    max_queued_commits: int = 256  # per session: commits waiting for the one before them
    max_outbox_bytes: int = 8 << 20  # per connection: frames the client has not read yet; beyond = closed
    max_watches_per_uid: int = 8  # concurrent Watch streams
    log_level: str = "info"
    metrics_address: str = ""  # e.g. 127.0.0.1:9464; empty = off
    watchdog: bool = True
    drain_timeout_s: float = 30.0
    # Cost model for relinquishing (µs, and bytes per µs), measured by `python -m bench.costmodel` on the
    # development host (2-vCPU Xeon, VAES); re-measure on yours.
    cost_nop_us: float = 4.5
    cost_rotate_us: float = 1.2
    cost_discard_fixed_us: float = 2.3
    endpoint_bytes_per_us: float = 7600.0
    worker_bytes_per_us: float = 6300.0

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.mode in MODE_NAMES, f"mode must be one of {', '.join(MODE_NAMES)}, got {self.mode!r}")
        need(self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}")
        need(self.workers >= 0, "workers must be >= 0 (0 = one per core)")
        need(4096 <= self.chunk_size <= 64 << 20, "chunk_size must be in [4 KiB, 64 MiB]")
        need(self.chunk_size % 16 == 0, "chunk_size must be a multiple of 16")
        need(self.h2d_slots >= 2 and self.d2h_slots >= 1, "need h2d_slots >= 2 and d2h_slots >= 1")
        need(1 <= self.demand_slots < self.h2d_slots, "demand_slots must be in [1, h2d_slots)")
        need(self.channels in (1, 2), "channels must be 1 or 2")
        need(self.max_sessions >= 1 and self.max_regions >= 1 and self.max_intents >= 1, "limits must be >= 1")
        for name in _COUNT_LIMITS:
            need(getattr(self, name) >= 1, f"{name} must be >= 1")
        need(self.connect_rate_per_uid > 0, "connect_rate_per_uid must be > 0")
        need(self.max_outbox_bytes >= 256 << 10, "max_outbox_bytes must be >= 256 KiB (a few full frames)")
        need(all(u >= 0 for u in self.admin_uids), "admin_uids must be uids (>= 0)")
        need(self.key_usage_upper > 1, "key_usage_upper must be > 1")
        need(0 <= self.key_usage_lower < self.key_usage_upper, "key_usage_lower must be < key_usage_upper")
        need(
            self.generation_granule >= 4096 and self.generation_granule & (self.generation_granule - 1) == 0,
            "generation_granule must be a power of two >= 4096",
        )
        need(self.pool_bytes >= self.arena_bytes(), "pool_bytes is smaller than one session's arena")
        need(0o600 <= self.socket_mode <= 0o777, "socket_mode must be an octal mode like 0o660")
        need(
            self.max_depth >= 1 and self.ahead_bytes >= self.chunk_size,
            "max_depth >= 1, ahead_bytes >= chunk_size",
        )

    def arena_bytes(self) -> int:
        from pipellm_client.arena import ArenaLayout

        return ArenaLayout(self.chunk_size, self.h2d_slots, self.d2h_slots).size

    @property
    def data_socket(self) -> str:
        return data_socket_path(self.socket)

    def effective_workers(self) -> int:
        if self.mode == "naive":
            return 1
        return self.workers or default_worker_count()


def default_worker_count() -> int:
    """One crypto worker per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SETTINGS: Final = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    f = SETTINGS.get(name)
    if f is None:
        raise ConfigError(f"unknown setting {name!r}")
    kind = str(f.type)
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value, 0) if isinstance(value, str) else int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(x) for x in items if str(x).strip() != "")
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r}: cannot use {value!r} as {kind}") from None


def load(path: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Defaults < TOML file < PIPELLM_<NAME> environment < explicit overrides (command-line flags)."""
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        table = data.get("pipellmd", data)
        if not isinstance(table, dict):
            raise ConfigError(f"config {path}: [pipellmd] must be a table")
        for k, v in table.items():
            values[k] = _coerce(k, v)
    source = dict(os.environ) if env is None else env
    for k in SETTINGS:
        raw = source.get("PIPELLM_" + k.upper())
        if raw is not None:
            values[k] = _coerce(k, raw)
    for k, v in overrides.items():
        if v is not None:
            values[k] = _coerce(k, v)
    return Config(**values)


__all__ = ["DEFAULT_SOCKET", "SETTINGS", "Config", "ConfigError", "load"]
