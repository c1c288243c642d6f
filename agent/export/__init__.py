"""Sinks that take flow records out of the agent: IPFIX (``ipfix/``) and JSON lines."""
