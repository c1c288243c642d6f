"""TLS files of a rendered config that live in Secrets: ``secret:NAME/KEY`` references.

The operator never copies key material into ConfigMaps; it writes a
reference, and the agent reads the Secret in its own namespace and writes
the keys to files only it can read.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from ..config import AgentConfig, ConfigError, show
from ..config.rules import SECRET_KEY_PATTERN, SECRET_NAME_MAX_LENGTH, SECRET_NAME_PATTERN
from ..contract import SECRET_PREFIX


def resolve_secret_files(doc: Any, read_secret: Callable[[str], dict[str, bytes]], directory: str) -> Any:
    """Replace ``secret:NAME/KEY`` TLS references by files written under ``directory``.

    ``read_secret(NAME)`` returns the Secret's decoded data (KeyError if the
    Secret does not exist). ConfigError names a missing Secret or ca.crt.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("collectors"), list):
        return doc  # parse_config names what is wrong with it
    out = dict(doc)
    collectors = []
    for i, collector in enumerate(doc.get("collectors") or []):
        tls = collector.get("tls") if isinstance(collector, dict) else None
        if not isinstance(tls, dict):
            collectors.append(collector)
            continue
        tls = dict(tls)
        for key in ("ca", "cert", "key"):
            ref = tls.get(key)
            if not (isinstance(ref, str) and ref.startswith(SECRET_PREFIX)):
                continue
            secret, _, item = ref[len(SECRET_PREFIX):].partition("/")
            # both become path parts of the file written: never '..', never a '/'
            if not re.fullmatch(SECRET_NAME_PATTERN, secret) or len(secret) > SECRET_NAME_MAX_LENGTH:
                raise ConfigError(f"collectors[{i}].tls.{key}: {show(ref)}: {show(secret)} is not a Secret name; "
                                  f"accepted: {SECRET_PREFIX}NAME/KEY with NAME a DNS subdomain name")
            if not re.fullmatch(SECRET_KEY_PATTERN, item) or item in (".", ".."):
                raise ConfigError(f"collectors[{i}].tls.{key}: {show(ref)}: {show(item)} is not a Secret key; "
                                  f"accepted: {SECRET_PREFIX}NAME/KEY with KEY of letters, digits, '-', '_', '.'")
            try:
                data = read_secret(secret)
            except KeyError:
                raise ConfigError(f"collectors[{i}].tls: Secret {show(secret)} not found in the agent's namespace; "
                                  f"accepted: a Secret with ca.crt (and optionally tls.crt, tls.key)") from None
            if item not in data:
                if key == "ca":
                    raise ConfigError(f"collectors[{i}].tls.ca: Secret {show(secret)} has no key {show(item)}; "
                                      "accepted: a Secret with ca.crt")
                tls.pop(key)
                continue
            folder = os.path.join(directory, secret)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            path = os.path.join(folder, item)
            with open(path, "wb") as handle:
                handle.write(data[item])
            tls[key] = path
        if ("cert" in tls) != ("key" in tls):  # client authentication needs both
            tls.pop("cert", None)
            tls.pop("key", None)
        collectors.append({**collector, "tls": tls})
    if "collectors" in doc:
        out["collectors"] = collectors
    return out


def secret_file_labels(config: AgentConfig, directory: str) -> dict[str, str]:
    """The TLS files of ``config`` that came from Secrets, named as Secret and key (for messages)."""
    labels = {}
    for collector in config.collectors:
        tls = collector.tls
        for path in (tls.ca_file, tls.cert_file, tls.key_file) if tls is not None else ():
            if path and os.path.dirname(os.path.dirname(path)) == directory:
                secret, item = os.path.basename(os.path.dirname(path)), os.path.basename(path)
                labels[path] = f"Secret {secret!r} key {item!r}"
    return labels
