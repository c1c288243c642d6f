"""A configuration file: read it with bounds, then parse it (``document``, then ``parse``).

Reading is the one thing here that touches the host: the file must be a
regular file (a FIFO would block the agent, /dev/zero never ends), at most
one octet over the size limit is read, and a file that changed while it was
read (a writer still at work) is refused rather than parsed half-written.

On a reload (``reloading=True``) the file must also end with a newline. A
file cut short while it is written -- a shell redirection, a copy that ran
out of space -- almost always ends mid-line, and such a prefix can still be
valid YAML with valid values (``jsonLines: /var/log/kip``); every editor
and ``yaml.dump`` end a file with a newline. The other half of that rule is
``reload.check_reload``, which refuses a reload that would stop metering
or exporting altogether.
"""

from __future__ import annotations

import os
import stat

from .document import MAX_DOCUMENT_BYTES, parse_document
from .errors import ConfigError
from .model import AgentConfig, MetricsConfig
from .parse import parse_config, parse_metrics_section

STOP_HINT = ("to stop kipfix, stop the agent (SIGTERM, e.g. systemctl stop kipfix): it exports what it counted "
             "and detaches")


def read_config_file(path: str) -> bytes:
    """The file's octets (at most one over the limit); ConfigError naming the file otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ConfigError(f"config file {path!r} is not a regular file; accepted: a YAML file")
        chunks, size = [], 0
        while size <= MAX_DOCUMENT_BYTES:
            chunk = os.read(fd, MAX_DOCUMENT_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        after = os.fstat(fd)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or \
            (len(data) != after.st_size and len(data) <= MAX_DOCUMENT_BYTES):
        raise ConfigError(f"{path}: the file changed while it was read (still being written?); write it "
                          "completely, then reload")
    return data


def load_config(path: str, *, reloading: bool = False) -> AgentConfig:
    """Read, decode and validate a YAML file; ConfigError names the file, the key and what is wrong."""
    data = read_config_file(path)
    try:
        return config_from_bytes(data, reloading=reloading)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_from_bytes(data: bytes, *, reloading: bool = False) -> AgentConfig:
    """A configuration file's octets to an AgentConfig (pure); ConfigError without the file's name."""
    return parse_config(parse_document(data, STOP_HINT, final_newline=reloading))


def load_metrics_config(path: str) -> MetricsConfig:
    """A file holding only a ``metrics:`` section (``kipfix agent --metrics-config``)."""
    data = read_config_file(path)
    try:
        return parse_metrics_section(parse_document(data, STOP_HINT))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
