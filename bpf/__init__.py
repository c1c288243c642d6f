"""The tc flow metering program, compiled by BCC at load time (flowmeter.c)."""

from pathlib import Path

SOURCE = Path(__file__).with_name("flowmeter.c")
