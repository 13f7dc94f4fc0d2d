"""Controllers: the operator's runtime between kopf's event stream and the runners.

kopf delivers watch events (DMRModels, runner pods, Services, Agents) to thin handlers, which
hand them to these controllers. The controllers keep an in-memory picture of the cluster, decide
with the pure functions of ``dmr_operator.reconcile`` what must change, and do the I/O through
``dmr_operator.clients``: one worker per runner process (model-runner keeps configuration per
process), coalesced status writes, Events on transitions.
"""
