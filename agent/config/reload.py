"""What a reload may not do: stop metering, or stop exporting, all at once.

An empty file, or one cut short while it was written (a shell redirection
racing the SIGHUP, a disk that filled up), usually still parses: YAML reads
a prefix of a configuration as a smaller configuration. Such a file drops
the sections at its end -- typically every interface, or every exporter --
so a reload that would leave the agent metering nothing, or exporting
nowhere, while the running configuration does, is refused. Doing that on
purpose is stopping the agent, and the message says so.

``load.load_config(reloading=True)`` adds the other half: a file must end
with a newline.
"""

from __future__ import annotations

import re

from .errors import ConfigError
from .load import STOP_HINT
from .model import AgentConfig
from .parse import TOP_LEVEL_KEYS


def _exports(config: AgentConfig) -> list[str]:
    return [c.address for c in config.collectors] + ([f"jsonLines {config.json_lines}"] if config.json_lines else [])


def check_reload(running: AgentConfig, new: AgentConfig) -> None:
    """ConfigError if ``new`` would stop all metering or all export that ``running`` does."""
    if (running.interfaces or running.pods) and not (new.interfaces or new.pods):
        raise ConfigError(f"interfaces: the new configuration selects no interface, the running one "
                          f"{len(running.interfaces) + len(running.pods)} selection(s); refused, because an empty "
                          f"or truncated file looks like this, and the running configuration stays; {STOP_HINT}")
    if _exports(running) and not _exports(new):
        raise ConfigError(f"collectors: the new configuration exports nowhere (no collectors, no jsonLines), the "
                          f"running one to {', '.join(_exports(running))}; refused, because an empty or truncated "
                          f"file looks like this, and the running configuration stays; {STOP_HINT}")


def changed_keys(running: AgentConfig, new: AgentConfig) -> list[str]:
    """The top-level keys whose values differ: the log line of an applied reload names them."""
    return [key for key in TOP_LEVEL_KEYS if getattr(running, _field(key)) != getattr(new, _field(key))]


def _field(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), key)  # maxFlows -> max_flows
