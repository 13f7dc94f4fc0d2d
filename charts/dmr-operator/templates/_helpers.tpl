{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "dmr-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the operator's objects: <release>-<chart>, or the release name alone when it
already contains the chart name.
*/}}
{{- define "dmr-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "dmr-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the release.
*/}}
{{- define "dmr-operator.labels" -}}
helm.sh/chart: {{ include "dmr-operator.chart" . }}
{{ include "dmr-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dmr-operator
{{- end }}

{{/*
Labels that identify the release's objects; selectors add a component.
*/}}
{{- define "dmr-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dmr-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the operator's own pods.
*/}}
{{- define "dmr-operator.operatorSelectorLabels" -}}
{{ include "dmr-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Metadata for the generated CRD templates (templates/crds/): the standard labels and, with
crds.keep, the annotation that makes `helm uninstall` leave them (and every object) in place.
*/}}
{{- define "dmr-operator.crdMetadata" -}}
labels:
  {{- include "dmr-operator.labels" . | nindent 2 }}
{{- if .Values.crds.keep }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "dmr-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dmr-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dmr-operator.leaseName" -}}
{{- default (include "dmr-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Whether kopf serves the whole cluster (--all-namespaces) rather than the listed namespaces
(--namespace).
*/}}
{{- define "dmr-operator.watchesCluster" -}}
{{- if empty .Values.watchNamespaces }}true{{- end }}
{{- end }}

{{/*
Name of a runner pool's StatefulSet and Service; the operator and the examples rely on it.
Call with (dict "root" $ "pool" $pool).
*/}}
{{- define "dmr-operator.poolName" -}}
{{- printf "%s-pool-%s" .root.Release.Name .pool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of a runner pool's objects. Call with (dict "root" $ "pool" $pool).
*/}}
{{- define "dmr-operator.poolLabels" -}}
{{ include "dmr-operator.labels" .root }}
app.kubernetes.io/component: model-runner
dmr.dev/pool: {{ .pool.name }}
{{- end }}

{{/*
Labels of a pool's pods and volume claims: no chart version, because volumeClaimTemplates are
immutable and a changed pod template restarts runners (each restart drops their in-memory
configuration). Call with (dict "root" $ "pool" $pool).
*/}}
{{- define "dmr-operator.poolStableLabels" -}}
{{ include "dmr-operator.selectorLabels" .root }}
app.kubernetes.io/component: model-runner
dmr.dev/pool: {{ .pool.name }}
{{- end }}

{{/*
A runner pool entry merged over runnerPoolDefaults. Booleans are resolved with hasKey because
sprig's merge treats an explicit false as unset. Returns YAML; use with fromYaml.
*/}}
{{- define "dmr-operator.pool" -}}
{{- $pool := merge (deepCopy .pool) (deepCopy .root.Values.runnerPoolDefaults) }}
{{- $_ := set $pool "cloudEnvironment" (ternary .pool.cloudEnvironment .root.Values.runnerPoolDefaults.cloudEnvironment (hasKey .pool "cloudEnvironment")) }}
{{- $_ := set $pool "preStopSleepSeconds" (int (ternary .pool.preStopSleepSeconds .root.Values.runnerPoolDefaults.preStopSleepSeconds (hasKey .pool "preStopSleepSeconds"))) }}
{{- /* engine picks the image flavour; vllm: true is the older spelling of engine: vllm. */}}
{{- $engine := default (ternary "vllm" "llama.cpp" (and (hasKey .pool "vllm") .pool.vllm)) .pool.engine }}
{{- $_ := set $pool "engine" $engine }}
{{- /* PyTorch engines share tensors through /dev/shm. */}}
{{- $_ := set $pool "sharedMemory" (ne $engine "llama.cpp") }}
{{- $_ := set $pool "accelerator" (default "cpu" .pool.accelerator) }}
{{- $_ := set $pool "replicas" (ternary .pool.replicas 1 (hasKey .pool "replicas")) }}
{{- if not .pool.image }}
{{- $tag := get (dict "nvidia" "latest-cuda" "amd" "latest-rocm" "cpu" "latest") $pool.accelerator }}
{{- if ne $engine "llama.cpp" }}
{{- if ne $pool.accelerator "nvidia" }}
{{- fail (printf "runnerPools[%s]: engine %s needs accelerator: nvidia (its image is CUDA only; set image for another build)" .pool.name $engine) }}
{{- end }}
{{- $tag = printf "latest-%s-cuda" $engine }}
{{- end }}
{{- $_ := set $pool "image" (printf "%s:%s" $pool.imageRepository $tag) }}
{{- end }}
{{- if .pool.gpuClaim }}
{{- /* GPUs through DRA: a claim per pod instead of an extended resource. */}}
{{- $claim := .pool.gpuClaim }}
{{- if eq (empty $claim.deviceClassName) (empty $claim.resourceClaimTemplateName) }}
{{- fail (printf "runnerPools[%s].gpuClaim: give deviceClassName (the chart makes a claim template) or resourceClaimTemplateName (your own), not both or neither" .pool.name) }}
{{- end }}
{{- if and $claim.selectors (not $claim.deviceClassName) }}
{{- fail (printf "runnerPools[%s].gpuClaim.selectors: selectors narrow down the devices of deviceClassName: set it too" .pool.name) }}
{{- end }}
{{- else if ne $pool.accelerator "cpu" }}
{{- $_ := set $pool "gpuResource" (get (dict "nvidia" "nvidia.com/gpu" "amd" "amd.com/gpu") $pool.accelerator) }}
{{- $_ := set $pool "gpus" (ternary .pool.gpus 1 (hasKey .pool "gpus")) }}
{{- end }}
{{- toYaml $pool }}
{{- end }}
