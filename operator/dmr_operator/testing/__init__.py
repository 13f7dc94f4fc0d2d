"""Test and sandbox harness: a real local control plane, a kubelet-playing node simulator, waiting.

``controlplane`` runs etcd + kube-apiserver (+ controller-manager, scheduler); ``nodesim`` creates
simulated (GPU) Nodes and plays kubelet for pods bound to them, starting the process behind each
pod (a model-runner emulator for runner pods) on its own loopback address; ``waiting`` polls with
a deadline. Used by tests/integration, benchmarks and ``dmr-operator sandbox``; never by the
operator itself.
"""
