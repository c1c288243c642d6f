"""The kernel side: program load, pinned tables and drains, tc attach, interfaces and namespaces."""
