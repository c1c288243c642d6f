"""Flows: the flow record, the user-space flow cache (timeouts, end reasons) and veth deduplication.

Pure Python with no kernel or network access; everything above builds on it.
"""
