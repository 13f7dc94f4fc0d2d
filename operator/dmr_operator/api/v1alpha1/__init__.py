"""Version v1alpha1 of the ``dmr.dev`` API group: DMRModel and Agent."""
