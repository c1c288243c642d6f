"""Kubernetes node mode's parts: API client, node report, Secrets, pod watch, pod netns and pod metadata."""
