"""deploy/: the systemd unit, sysusers/tmpfiles, the example config and the Kubernetes manifests.

What can be checked on a build machine is checked for real: `systemd-analyze verify` and `security`
on the unit, sysusers/tmpfiles applied to a temporary root, the manifests against the Kubernetes
schemas, and the daemon itself run under the unit's sandbox as closely as a test can rebuild it (umask,
no_new_privs, PR_SET_MDWE for MemoryDenyWriteExecute, a seccomp filter for RestrictAddressFamilies,
a private network namespace, the rlimits) while data moves through it. What needs a tool this machine
lacks is skipped with the reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pipellm_client import Client

from pipellm_daemon import config

from .daemon_harness import checked_swap, checked_weights

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "pipellmd.service"
DROPIN = DEPLOY / "pipellmd.service.d" / "metrics.conf"
INSTALLED_PIPELLMD = "/opt/pipellm/bin/pipellmd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian/Ubuntu: apt-get install -y systemd)"
)


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, repeated keys kept (systemd allows them)."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _s, k, v in directives(path) if k == key]


def pipellmd_executable(tmp: Path) -> str:
    """An executable that starts this checkout's daemon, for ExecStart= to point at during `verify`."""
    venv = Path(sys.executable).parent / "pipellmd"
    if venv.exists():
        return str(venv)
    shim = tmp / "pipellmd"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m pipellm_daemon "$@"\n')
    shim.chmod(0o755)
    return str(shim)


def unit_copy(tmp: Path, with_dropin: bool) -> Path:
    """The unit (and its drop-in) with ExecStart pointed at an executable that exists on this machine."""
    exe = pipellmd_executable(tmp)
    unit = tmp / "pipellmd.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_PIPELLMD, exe))
    if with_dropin:
        (tmp / "pipellmd.service.d").mkdir(exist_ok=True)
        (tmp / "pipellmd.service.d" / "metrics.conf").write_text(DROPIN.read_text().replace(INSTALLED_PIPELLMD, exe))
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


# -- the unit ------------------------------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize("with_dropin", [False, True], ids=["base", "metrics-dropin"])
def test_unit_passes_systemd_analyze_verify(tmp_path, with_dropin):
    unit = unit_copy(tmp_path, with_dropin)
    r = analyze("verify", "--man=no", str(unit))
    # verify exits 0 on unknown keys and bad values too (it only warns): any line about our files fails.
    ours = [line for line in r.stderr.splitlines() if str(tmp_path) in line or "pipellmd.service" in line]
    assert r.returncode == 0 and not ours, r.stderr


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path):
    """Control for the test above: a misspelt option and a missing binary are reported."""
    unit = unit_copy(tmp_path, False)
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    r = analyze("verify", "--man=no", str(unit))
    assert "Unknown key 'ProtectHomes'" in r.stderr
    unit.write_text(UNIT.read_text())  # ExecStart=/opt/pipellm/bin/pipellmd, absent here
    r = analyze("verify", "--man=no", str(unit))
    assert r.returncode != 0 and "/opt/pipellm/bin/pipellmd" in r.stderr


@needs_analyze
@pytest.mark.parametrize(("with_dropin", "threshold"), [(False, 1.0), (True, 2.0)], ids=["base", "metrics-dropin"])
def test_unit_exposure_level(tmp_path, with_dropin, threshold):
    """`systemd-analyze security`: the base unit rates SAFE (< 1), with the metrics drop-in still OK."""
    unit = unit_copy(tmp_path, with_dropin)
    # --threshold counts tenths: 10 means an exposure level of 1.0
    r = analyze("security", "--offline=true", f"--threshold={round(threshold * 10)}", str(unit))
    if "--offline" in r.stderr and ("unrecognized" in r.stderr or "Unknown" in r.stderr):
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert level is not None, r.stdout + r.stderr
    assert r.returncode == 0, f"exposure {level.group(1)} over {threshold}:\n{r.stdout}"


def test_unit_settings_fit_the_daemon():
    """The unit agrees with the code: socket path, notify protocol, drain time, sandbox essentials."""
    d = dict((k, v) for _s, k, v in directives(UNIT))
    (exec_start,) = values(UNIT, "ExecStart")
    argv = exec_start.split()
    assert argv[0] == INSTALLED_PIPELLMD
    assert argv[argv.index("--socket") + 1] == config.DEFAULT_SOCKET == "/run/pipellm/pipellmd.sock"
    assert Path(config.DEFAULT_SOCKET).parent.name == d["RuntimeDirectory"] == "pipellm"
    assert d["Type"] == "notify" and d["NotifyAccess"] == "main" and d["Restart"] == "on-failure"
    assert d["User"] == d["Group"] == "pipellm"
    assert d["KillMode"] == "mixed"  # SIGTERM to the daemon only: workers must outlive the drain
    assert int(d["TimeoutStopSec"].rstrip("s")) > config.Config().drain_timeout_s + 5
    assert int(d["WatchdogSec"].rstrip("s")) >= 10
    assert d["UMask"] == "0077"
    for key, want in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateNetwork": "yes", "RestrictAddressFamilies": "AF_UNIX", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "MemoryDenyWriteExecute": "yes", "DevicePolicy": "closed",
        "CapabilityBoundingSet": "", "LimitCORE": "0",
    }.items():  # fmt: skip
        assert d.get(key) == want, key
    assert "PrivateDevices" not in d and "PrivateUsers" not in d  # GPUs, and SO_PEERCRED uids
    assert values(UNIT, "DeviceAllow") == ["char-nvidia* rw"]
    assert d["LimitMEMLOCK"] == "infinity"  # mlockall of the daemon and its workers (keys off swap)
    drop = dict((k, v) for _s, k, v in directives(DROPIN))
    assert drop["PrivateNetwork"] == "no"
    assert values(DROPIN, "RestrictAddressFamilies") == ["", "AF_UNIX AF_INET AF_INET6"]
    starts = values(DROPIN, "ExecStart")
    assert starts[0] == "" and starts[1].startswith(exec_start) and "--metrics-address 127.0.0.1:" in starts[1]


# -- sysusers and tmpfiles ----------------------------------------------------------------------------


@pytest.mark.skipif(
    not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
    reason="systemd-sysusers/systemd-tmpfiles not installed (Debian/Ubuntu: apt-get install -y systemd)",
)
def test_sysusers_and_tmpfiles_in_a_temporary_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(DEPLOY / "pipellm.sysusers.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user, group = users["pipellm"], groups["pipellm"]
    assert user[3] == group[2] and user[6].endswith("nologin")
    assert int(user[2]) < 1000  # a system user
    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(DEPLOY / "pipellm.tmpfiles.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    st = (root / "run/pipellm").stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (int(user[2]), int(group[2]))


# -- the example config ----------------------------------------------------------------------------


def test_example_config_lists_every_setting_with_its_default():
    text = (DEPLOY / "pipellmd.toml").read_text()
    table = tomllib.loads(text)["pipellmd"]
    assert set(table) == set(config.SETTINGS), set(table) ^ set(config.SETTINGS)
    assert config.load(str(DEPLOY / "pipellmd.toml"), env={}) == config.Config()
    # Each setting carries an explanation: the nearest line above its group of settings is a comment.
    lines = text.splitlines()
    setting = re.compile(r"^([a-z_0-9]+)\s*=")
    for i, line in enumerate(lines):
        m = setting.match(line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and setting.match(lines[j]):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"{m.group(1)} has no comment above it"


def test_example_config_is_what_the_daemon_reads(tmp_path):
    """The daemon's own flag parsing accepts the file: a typo there would stop it with exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text((DEPLOY / "pipellmd.toml").read_text().replace("drain_timeout_s", "drain_timout_s"))
    with pytest.raises(config.ConfigError, match="drain_timout_s"):
        config.load(str(bad), env={})


# -- Kubernetes -------------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict[str, Any]]]:
    yaml = pytest.importorskip("yaml")
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
    }


def test_k8s_manifests_match_the_schema():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (it is in the dev extra: pip install -e .[dev])",
    )
    available = kv.utils.all_versions()
    # A version many clusters still run, and the newest this kubernetes-validate ships.
    versions = sorted({v for v in ("1.30.0", kv.utils.latest_version()) if v in available})
    assert versions, available
    docs = manifests()
    assert {d["kind"] for ds in docs.values() for d in ds} >= {"DaemonSet", "ConfigMap", "Namespace"}
    for version in versions:
        for name, ds in docs.items():
            for d in ds:
                try:
                    kv.validate(d, version, strict=True)
                except kv.ValidationError as exc:
                    pytest.fail(f"{name} {d['kind']} against Kubernetes {version}: {exc}")


def test_k8s_daemonset_fits_the_daemon(tmp_path):
    docs = manifests()
    (ds,) = docs["daemonset.yaml"]
    (cm,) = docs["configmap.yaml"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    # The socket directory is the host's /run/pipellm, and every path names the same socket.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert vols["socket-dir"]["hostPath"]["path"] == mounts["socket-dir"] == "/run/pipellm"
    sock = c["command"][c["command"].index("--socket") + 1]
    assert sock == config.DEFAULT_SOCKET
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == "pipellmctl" and "health" in cmd and cmd[cmd.index("--socket") + 1] == sock, probe
        timeout = float(cmd[cmd.index("--timeout") + 1])
        assert c[probe]["timeoutSeconds"] > timeout, probe  # the CLI gives up (exit 3) before the kubelet does
    # The ConfigMap holds a config the daemon accepts, consistent with the pod.
    cfg_file = tmp_path / "pipellmd.toml"
    cfg_file.write_text(cm["data"]["pipellmd.toml"])
    cfg = config.load(str(cfg_file), env={})
    assert cfg.socket == sock and cfg.workers > 0
    assert pod["securityContext"]["runAsGroup"] in cfg.allowed_gids
    assert mounts["config"] + "/pipellmd.toml" == c["command"][c["command"].index("--config") + 1]
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and float(limit[:-2]) * (1 << 30) > cfg.pool_bytes
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_timeout_s
    # The one root step: an init container that may only chown the socket directory.
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False


# -- the daemon inside the unit's sandbox ------------------------------------------------------------

# Applied in the daemon process itself, then inherited by its crypto workers, as systemd would do:
#   UMask=0077, NoNewPrivileges=yes, LimitCORE=0, LimitMEMLOCK, MemoryDenyWriteExecute=yes (the kernel's
#   PR_SET_MDWE, the same rule as systemd's seccomp version), RestrictAddressFamilies= (a seccomp filter
#   on socket(2) answering EAFNOSUPPORT, as systemd's does).
_SANDBOX = r"""
import ctypes, json, os, resource, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
U = ctypes.c_ulong
os.umask(0o077)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
if spec["memlock"] < 0:  # as the unit: LimitMEMLOCK=infinity (the most the hard limit allows)
    want = hard
else:
    want = spec["memlock"] if hard == resource.RLIM_INFINITY else min(spec["memlock"], hard)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (want, hard))
assert libc.prctl(U(38), U(1), U(0), U(0), U(0)) == 0  # PR_SET_NO_NEW_PRIVS
if spec["mdwe"]:
    assert libc.prctl(U(65), U(1), U(0), U(0), U(0)) == 0  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN

class F(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

class P(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]

LD, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO_EAFNOSUPPORT = 0x7FFF0000, 0x00050000 | 97
fams = spec["families"]
n = len(fams)
prog = [F(LD, 0, 0, 4), F(JEQ, 1, 0, spec["arch"]), F(RET, 0, 0, ALLOW), F(LD, 0, 0, 0),
        F(JEQ, 0, n + 2, spec["nr_socket"]), F(LD, 0, 0, 16)]
prog += [F(JEQ, n - i, 0, fam) for i, fam in enumerate(fams)]
prog += [F(RET, 0, 0, ERRNO_EAFNOSUPPORT), F(RET, 0, 0, ALLOW)]
arr = (F * len(prog))(*prog)
fprog = P(len(prog), arr)
assert libc.prctl(U(22), U(2), ctypes.byref(fprog), U(0), U(0)) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
os.execv(sys.executable, [sys.executable, "-m", "pipellm_daemon", *sys.argv[2:]])
"""
_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(ctypes.c_ulong(66), 0, 0, 0, 0)) >= 0  # PR_GET_MDWE: EINVAL before Linux 6.3


def _can_unshare_net() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "--net", "true"], check=False, capture_output=True, timeout=30).returncode == 0


class SandboxedDaemon:
    """pipellmd started through _SANDBOX (and `unshare --net` for PrivateNetwork=yes when allowed)."""

    def __init__(self, tmp: Path, families: list[int], private_network: bool, **settings: Any) -> None:
        arch = _ARCH.get(platform.machine())
        if arch is None or sys.platform != "linux":
            pytest.skip(f"the seccomp filter here is written for x86_64/aarch64 Linux, not {platform.machine()}")
        self.mdwe = _mdwe_supported()
        self.private_network = private_network and _can_unshare_net()
        tmp.chmod(0o755)
        self.socket = str(tmp / "pipellmd.sock")
        self.log_path = tmp / "pipellmd.log"
        spec = {"families": families, "mdwe": self.mdwe, "memlock": -1, "arch": arch[0], "nr_socket": arch[1]}
        argv = [sys.executable, "-c", _SANDBOX, json.dumps(spec), "--socket", self.socket, "--log-level", "info"]
        if self.private_network:
            argv = ["unshare", "--net", *argv]
        env = dict(os.environ, PIPELLM_ALLOWED_UIDS=str(os.getuid()), PYTHONDONTWRITEBYTECODE="1")
        env.update({"PIPELLM_" + k.upper(): str(v) for k, v in settings.items()})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"event": "ready"' in self.log():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        raise AssertionError(f"pipellmd neither ready nor exited:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def _workload(socket: str) -> Any:
    with Client(socket) as c, c.open_session("sandbox") as s:
        checked_weights(s, 3 << 20, 5, loads=3)
        checked_swap(s, s.alloc_region(2 << 20, name="kv"), 0, 1 << 20)
        return c.status()


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["base", "metrics-dropin"])
def test_daemon_works_inside_the_units_sandbox(tmp_path, variant):
    if variant == "base":
        d = SandboxedDaemon(tmp_path, [AF_UNIX], private_network=True, workers=2, pool_bytes=1 << 30)
    else:
        d = SandboxedDaemon(
            tmp_path,
            [AF_UNIX, AF_INET, AF_INET6],
            private_network=False,
            workers=2,
            pool_bytes=1 << 30,
            metrics_address="127.0.0.1:0",
        )
    try:
        assert d.wait_ready(), d.log()
        # UMask=0077, yet both sockets are group-accessible: the daemon chmods them itself.
        for path in (d.socket, d.socket + ".data"):
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660, (path, oct(mode))
        st = _workload(d.socket)
        assert st.healthy and st.totals.bytes_d2h == 1 << 20 and st.workers.restarts == 0
        if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == resource.RLIM_INFINITY:
            assert st.keys_locked, st.key_protection  # LimitMEMLOCK=infinity: the unprivileged daemon mlockalls
        if variant == "metrics-dropin":
            line = next(x for x in d.log().splitlines() if '"metrics_listening"' in x)
            with urllib.request.urlopen(f"http://{json.loads(line)['address']}/metrics", timeout=10) as resp:
                assert b"pipellm_commits_total" in resp.read()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    assert "Traceback" not in d.log() and '"level": "error"' not in d.log()
    if not d.mdwe or (variant == "base" and not d.private_network):
        pytest.skip(
            "passed without "
            + ", ".join(
                x
                for x, on in (("PR_SET_MDWE (Linux < 6.3)", d.mdwe), ("a network namespace", d.private_network))
                if not on
            )
        )


@pytest.mark.integration
def test_metrics_without_the_dropin_fail_loudly(tmp_path):
    """metrics_address set but only AF_UNIX allowed (the base unit): the daemon must refuse to start."""
    d = SandboxedDaemon(tmp_path, [AF_UNIX], private_network=False, workers=1, metrics_address="127.0.0.1:0")
    try:
        assert not d.wait_ready(), "a daemon that cannot serve its metrics must not report ready"
    finally:
        rc = d.stop()
    assert rc != 0
    assert "metrics_address 127.0.0.1:0" in d.log() and "Address family not supported" in d.log()


# -- the syscall filter ------------------------------------------------------------------------------


def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out = analyze("syscall-filter", group).stdout.splitlines()[1:]
    names: set[str] = set()
    for line in (x.strip() for x in out):
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if line not in seen:
                seen.add(line)
                names |= _expand(line, seen)
        else:
            names.add(line)
    return names


@pytest.mark.integration
@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (apt-get install -y strace)")
def test_daemon_syscalls_fit_the_units_filter(tmp_path):
    """Every syscall of the daemon and its workers under a workload is in SystemCallFilter=@system-service
    and none in the ~@privileged exclusion (a refused one would fail with EPERM in production)."""
    (allowed_group,) = [v for v in values(UNIT, "SystemCallFilter") if v.startswith("@")]
    (denied_group,) = [v[1:] for v in values(UNIT, "SystemCallFilter") if v.startswith("~")]
    trace = tmp_path / "trace"
    sock = str(tmp_path / "pipellmd.sock")
    log = tmp_path / "log"
    env = dict(os.environ, PIPELLM_ALLOWED_UIDS=str(os.getuid()), PIPELLM_WORKERS="2", PIPELLM_POOL_BYTES=str(1 << 30))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "pipellm_daemon", "--socket", sock],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b'"event": "ready"' not in log.read_bytes():
            if proc.poll() is not None:
                pytest.skip(f"cannot trace here: {log.read_text()[-500:]}")
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        _workload(sock)
        assert subprocess.run([*_ctl(sock), "status"], check=False, capture_output=True, timeout=60).returncode == 0
    finally:
        # SIGTERM the daemon itself (strace would only detach); strace exits when its tracees have.
        ready = [json.loads(x) for x in log.read_text().splitlines() if '"event": "ready"' in x]
        if ready:
            os.kill(int(ready[0]["pid"]), signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    used = set(re.findall(r"^\d+\s+([a-z_0-9]+)\(", trace.read_text(), re.M))
    assert {"memfd_create", "sendmsg", "mlock", "socketpair"} <= used  # the trace saw the real work
    allowed, denied = _expand(allowed_group), _expand(denied_group)
    assert used - allowed == set(), f"outside {allowed_group}"
    assert used & denied == set(), f"inside {denied_group}"


def _ctl(sock: str) -> list[str]:
    return [sys.executable, "-m", "pipellm_client.ctl", "--socket", sock]


# -- docs ----------------------------------------------------------------------------------------------


def test_operations_doc_covers_every_setting_and_verb():
    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [name for name in config.SETTINGS if f"`{name}`" not in doc]
    assert not missing, f"settings not documented in docs/operations.md: {missing}"
    for verb in ("status", "sessions", "watch", "health"):
        assert f"pipellmctl {verb}" in doc, verb
    for name in ("pipellm_commits_total", "pipellm_commit_latency_seconds", "pipellm_hit_rate"):
        assert name in doc, name
