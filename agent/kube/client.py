"""The Kubernetes API client of the agent and the operator: every call times out.

The client's default is no timeout at all, so a black-holed API server would
hang a call silently for minutes; here every call gets one, in one place.
"""

from __future__ import annotations

from typing import Any

from ..contract import REQUEST_TIMEOUT


def api_client(configuration: Any = None):
    """A kubernetes ApiClient whose calls time out (REQUEST_TIMEOUT) unless they name their own timeout.

    The client's default is no timeout at all, so a black-holed API server would hang a call
    silently for minutes; here every call of the agent and the operator gets one, in one place.
    Watches pass their own (longer than their server-side timeout).
    """
    from kubernetes import client

    class TimeoutApiClient(client.ApiClient):
        def request(self, *args: Any, _request_timeout: Any = None, **kwargs: Any):
            return super().request(*args, _request_timeout=_request_timeout or REQUEST_TIMEOUT, **kwargs)

    return TimeoutApiClient(configuration)


def load_kube_config():
    """An API client from the pod's service account, or else the kubeconfig (KUBECONFIG)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return api_client()
