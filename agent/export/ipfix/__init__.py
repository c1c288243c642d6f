"""IPFIX (RFC 7011/7012) exporting process, decoder and built-in collector.

One module per layer: ``infomodel`` (Information Elements), ``fields`` (how
each element is filled from a FlowRecord), ``template`` (compiled packing
plans), ``message`` (message and set framing), ``session`` (sequence numbers
and templates per transport session and observation domain), ``options``
(options templates and their records), ``transport`` (UDP/TCP/TLS),
``exporter`` (the FlowSink), ``decoder`` and ``collector``.
"""
