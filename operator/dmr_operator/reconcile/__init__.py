"""Pure reconcile logic: desired state, rendering, status and conditions. No I/O here.

Everything in this package is a function of its arguments, so it is unit-tested without a
cluster or a runner; ``dmr_operator.controllers`` calls it and does the I/O through ``clients``.
"""
