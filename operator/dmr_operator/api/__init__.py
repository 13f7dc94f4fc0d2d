"""The API of dmr-operator: pydantic models that are the single source of the CRD schemas.

``v1alpha1`` holds the served version; ``crdgen`` turns the models into CustomResourceDefinitions
(``dmr-operator crds``). Descriptions on fields become ``kubectl explain`` text.
"""
