"""The built-in collector (``kipfix collect``): listens for IPFIX and prints decoded records."""
