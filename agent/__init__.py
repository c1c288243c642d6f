"""kipfix agent: tc eBPF flow metering, flow cache and export."""

__version__ = "0.1.0"
