"""Check a parsed configuration against this host: what ``parse`` cannot know.

The agent runs this after parsing and before it loads or changes anything
(at start, on SIGHUP, for each ConfigMap), so a mistake is refused while the
running configuration -- or nothing at all -- is in force:

- collector host names resolve (an IP address always does);
- TLS files exist, are readable, and load in ``ssl`` as what they should be:
  the CA as PEM certificates, the client certificate with its key;
- the ``jsonLines`` file can be written: its directory exists, the path is
  a regular file or a character device if it exists (a FIFO would block the
  agent), and it is writable;
- an interface selection's ``netns``, when its file exists, is a network
  namespace (a netns that does not exist yet is waited for: the attach
  manager reports it and attaches when it appears);
- ``pinPath`` lies on a bpf filesystem (or under /sys/fs/bpf while nothing
  is mounted there: the agent mounts it).

Errors are ConfigError naming the key path, the value and what is accepted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import ssl
import stat
from typing import Mapping

from .errors import ConfigError, show
from .model import AgentConfig, MetricsConfig, TLSConfig

NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: the CLONE_NEW* type of the namespace (Linux >= 4.11)
CLONE_NEWNET = 0x40000000


def resolve_config(config: AgentConfig, source: str = "", file_labels: Mapping[str, str] | None = None) -> None:
    """ConfigError (prefixed by ``source``) for the first thing the host says is wrong.

    ``file_labels`` names files the agent wrote itself (a Secret's key) so
    that a message speaks of the Secret, not of a temporary path.
    """
    try:
        _check_collectors(config, file_labels or {})
        _check_json_lines(config.json_lines)
        _check_netns(config)
        _check_pin_path(config.pin_path)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None


# ---- collectors -------------------------------------------------------------------------

def _check_collectors(config: AgentConfig, labels: Mapping[str, str]) -> None:
    for i, collector in enumerate(config.collectors):
        try:
            socket.getaddrinfo(collector.host, collector.port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as err:
            reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
            raise ConfigError(f"collectors[{i}].address: host {show(collector.host)} does not resolve ({reason}); "
                              "accepted: an IP address, or a name this host resolves") from None
        if collector.tls is not None:
            _check_tls(collector.tls, f"collectors[{i}].tls", labels)


def _file_label(path: str, labels: Mapping[str, str]) -> str:
    return labels.get(path) or f"file {show(path)}"


def _readable_file(path: str, where: str, label: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise ConfigError(f"{where}: {label} cannot be read ({err.strerror}); accepted: a readable PEM "
                          "file") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not regular:
        raise ConfigError(f"{where}: {label} is not a regular file; accepted: a readable PEM file")


def _no_password() -> str:
    return ""  # an encrypted key then fails to load, instead of OpenSSL asking on a terminal


def _check_tls(tls: TLSConfig, path: str, labels: Mapping[str, str]) -> None:
    ca = _file_label(tls.ca_file, labels)
    _readable_file(tls.ca_file, f"{path}.ca", ca)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        context.load_verify_locations(cafile=tls.ca_file)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{path}.ca: {ca} is not a PEM CA certificate (ssl: {_ssl_reason(err)}); accepted: "
                          "a PEM file with the CA certificate(s) that signed the collector's certificate") from None
    if tls.cert_file is None or tls.key_file is None:
        return
    cert, key = _file_label(tls.cert_file, labels), _file_label(tls.key_file, labels)
    _readable_file(tls.cert_file, f"{path}.cert", cert)
    _readable_file(tls.key_file, f"{path}.key", key)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{path}.cert: {cert} and {key} do not load as a certificate and its private key "
                          f"(ssl: {_ssl_reason(err)}); accepted: PEM files of the client certificate and its "
                          "unencrypted private key") from None


def resolve_metrics(metrics: MetricsConfig, source: str = "") -> None:
    """The metrics endpoint's TLS and password files load (at start only: a reload does not change
    the endpoint). ConfigError names the key and the file."""
    try:
        if metrics.tls is not None:
            _check_metrics_tls(metrics)
        auth = metrics.basic_auth
        if auth is not None:
            for key, path in (("passwordFile", auth.password_file), ("usernameFile", auth.username_file)):
                if path is None:
                    continue
                try:
                    with open(path, "rb") as handle:
                        value = handle.read(65537).rstrip(b"\r\n")
                except OSError as err:
                    raise ConfigError(f"metrics.basicAuth.{key}: file {show(path)} cannot be read ({err.strerror}); "
                                      "accepted: a readable file") from None
                if not value:
                    raise ConfigError(f"metrics.basicAuth.{key}: file {show(path)} is empty; accepted: a file "
                                      "holding the value")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None


def _check_metrics_tls(metrics: MetricsConfig) -> None:
    tls = metrics.tls
    labels: dict[str, str] = {}
    for key, path in (("cert", tls.cert), ("key", tls.key), ("clientCA", tls.client_ca)):
        if path is not None:
            _readable_file(path, f"metrics.tls.{key}", _file_label(path, labels))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"metrics.tls.cert: file {show(tls.cert)} and file {show(tls.key)} do not load as a "
                          f"certificate and its private key (ssl: {_ssl_reason(err)}); accepted: PEM files of the "
                          "server certificate and its unencrypted private key") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"metrics.tls.clientCA: file {show(tls.client_ca)} is not a PEM CA certificate "
                              f"(ssl: {_ssl_reason(err)}); accepted: a PEM file with the CA certificate(s) that "
                              "sign the scrapers' certificates") from None


def _ssl_reason(err: Exception) -> str:
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", " ".join(str(err).split()))  # where in CPython: no help to a user
    return text if len(text) <= 200 else text[:197] + "..."


# ---- files and namespaces -------------------------------------------------------------------

def _check_json_lines(path: str | None) -> None:
    from .rules import JSON_LINES_STDOUT

    if path is None or path == JSON_LINES_STDOUT:
        return
    accepted = f"accepted: a file in an existing directory this agent can write to, or {JSON_LINES_STDOUT} for stdout"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"jsonLines: {show(path)}: directory {show(folder)} does not exist; {accepted}")
    if os.path.isdir(path):
        raise ConfigError(f"jsonLines: {show(path)} is a directory; {accepted}")
    if os.path.exists(path) and not (stat.S_ISREG(os.stat(path).st_mode) or stat.S_ISCHR(os.stat(path).st_mode)):
        # a FIFO without a reader would block the agent in open() for good
        raise ConfigError(f"jsonLines: {show(path)} is neither a regular file nor a character device; {accepted}")
    target = path if os.path.lexists(path) else folder
    if not os.access(target, os.W_OK):
        raise ConfigError(f"jsonLines: {show(path)}: {'the file' if target == path else 'its directory'} "
                          f"is not writable; {accepted}")


def _check_netns(config: AgentConfig) -> None:
    from ..datapath.netns import NetnsRef

    for i, selection in enumerate(config.interfaces):
        ref = NetnsRef.parse(selection.netns)
        if ref.path is None or not os.path.lexists(ref.path):
            continue  # the host's, or not there yet: attached when it appears
        where = f"interfaces[{i}].netns"
        accepted = "accepted: a name from `ip netns` or a path such as /proc/PID/ns/net"
        try:
            fd = os.open(ref.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise ConfigError(f"{where}: {show(selection.netns)}: cannot open {show(ref.path)} "
                              f"({err.strerror}); {accepted}") from None
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as err:
            if err.errno not in (errno.ENOTTY, errno.EINVAL):
                raise ConfigError(f"{where}: {show(selection.netns)}: {show(ref.path)} cannot be checked "
                                  f"({err.strerror}); {accepted}") from None
            kind = None
        finally:
            os.close(fd)
        if kind != CLONE_NEWNET:
            what = "another kind of namespace" if kind is not None else "not a namespace file"
            raise ConfigError(f"{where}: {show(selection.netns)}: {show(ref.path)} is {what}, not a network "
                              f"namespace; {accepted}")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # mountinfo writes a blank as \040


def _mount_type(path: str) -> tuple[str, str] | None:
    """(filesystem type, mount point) of the mount holding ``path`` (or its nearest existing ancestor)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    device = os.stat(existing).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    candidates = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 10 and fields[2] == wanted and "-" in fields:
                candidates.append((fields[fields.index("-") + 1], _unescape(fields[4])))
    # bind mounts share a device: the deepest mount point above the path is the one that holds it
    holding = [c for c in candidates if existing == c[1] or existing.startswith(c[1].rstrip("/") + "/")]
    return max(holding, key=lambda c: len(c[1])) if holding else (candidates[0] if candidates else None)


def _check_pin_path(pin_path: str) -> None:
    from ..datapath.meter import BPFFS

    if os.path.lexists(pin_path) and not os.path.isdir(pin_path):
        raise ConfigError(f"pinPath: {show(pin_path)} exists and is not a directory; accepted: a directory on a "
                          "bpf filesystem, such as /sys/fs/bpf/kipfix")
    mount = _mount_type(pin_path)
    if mount is None or mount[0] == "bpf":
        return  # None: /proc/self/mountinfo does not show the device; loading the program will tell
    if _mount_type(BPFFS) != ("bpf", BPFFS) and (pin_path + "/").startswith(BPFFS + "/"):
        return  # the agent mounts bpffs at /sys/fs/bpf before it pins anything
    fstype, point = mount
    raise ConfigError(f"pinPath: {show(pin_path)} is on a {fstype} filesystem (mounted at {point}), not bpf; "
                      f"accepted: a directory on a bpf filesystem, such as {BPFFS}/kipfix (mount one with "
                      f"`mount -t bpf bpf {BPFFS}`)")
