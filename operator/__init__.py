"""kipfix operator: FlowExporter custom resources -> per-node agent ConfigMaps.

Modules: ``spec`` (typed parse and validation), ``render`` (per-node merge),
``status`` (conditions and agent reports), ``reconcile`` (API reads and
writes), ``handlers`` (kopf), ``rbac`` (the API calls it makes),
``__main__`` (``python -m kipfix.operator`` / ``kipfix operator``).
"""
