{{/* Chart name, overridable. */}}
{{- define "kubeforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Base name of every resource: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "kubeforge.fullname" -}}
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

{{- define "kubeforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "kubeforge.labels" -}}
helm.sh/chart: {{ include "kubeforge.chart" . }}
{{ include "kubeforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
{{- end }}

{{/* Labels that select the operator pod (immutable once installed). */}}
{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository:tag, or repository@sha256:... when the tag is a digest. */}}
{{- define "kubeforge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* A workload image: the value when set, else <workloads.registry>/<name>:<appVersion>. Call with (list . "name" value). */}}
{{- define "kubeforge.workloadImage" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $value := index . 2 }}
{{- default (printf "%s/%s:%s" $root.Values.workloads.registry $name $root.Chart.AppVersion) $value }}
{{- end }}

{{- define "kubeforge.webhookServiceName" -}}
{{- printf "%s-webhook" (include "kubeforge.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Host name the API server calls the webhook at; the self-signed certificate is issued for it. */}}
{{- define "kubeforge.webhookHost" -}}
{{- printf "%s.%s.svc" (include "kubeforge.webhookServiceName" .) .Release.Namespace }}
{{- end }}

{{/* The webhook's TLS Secret. */}}
{{- define "kubeforge.webhookSecretName" -}}
{{- if eq .Values.webhook.certificate "secret" }}
{{- required "webhook.secretName is required with webhook.certificate=secret" .Values.webhook.secretName }}
{{- else }}
{{- printf "%s-webhook-tls" (include "kubeforge.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Kinds the operator serves, by plural. */}}
{{- define "kubeforge.plurals" -}}
pretrainjobs contextextensionjobs rljobs inferencedeployments
{{- end }}

{{/* The operator's rules on namespaced resources: in its ClusterRole, or in a Role per watched namespace. */}}
{{- define "kubeforge.namespacedRules" }}
  # kubeforge's kinds: watched by kopf, patched (kopf's annotations, an old finalizer removed), deleted
  # after ttlSecondsAfterFinished
  - apiGroups: ["kubeforge.dev"]
    resources: ["pretrainjobs", "contextextensionjobs", "rljobs", "inferencedeployments"]
    verbs: ["get", "list", "watch", "patch", "delete"]
  - apiGroups: ["kubeforge.dev"]
    resources: ["pretrainjobs/status", "contextextensionjobs/status", "rljobs/status", "inferencedeployments/status"]
    verbs: ["get", "patch"]
  # children carry blockOwnerDeletion ownerReferences: with OwnerReferencesPermissionEnforcement on, that
  # needs update on the owner's finalizers
  - apiGroups: ["kubeforge.dev"]
    resources: ["pretrainjobs/finalizers", "contextextensionjobs/finalizers", "rljobs/finalizers", "inferencedeployments/finalizers"]
    verbs: ["update"]
  # gang pods (listed by the reconcilers, watched by kopf); patch is also what per-job Roles grant
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  # rendezvous Services, resolved-spec ConfigMaps, per-job ServiceAccounts: by name only, never listed
  - apiGroups: [""]
    resources: ["services", "configmaps", "serviceaccounts"]
    verbs: ["get", "create", "patch", "delete"]
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create"]
  # an InferenceDeployment's KV token: created, never read (the operator holds no credential)
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["create"]
  # disaggregated engines reachable only from their deployment's pods
  - apiGroups: ["networking.k8s.io"]
    resources: ["networkpolicies"]
    verbs: ["get", "create", "patch", "delete"]
  # per-job least-privilege Role + RoleBinding (what they grant is held above: no bind/escalate)
  - apiGroups: ["rbac.authorization.k8s.io"]
    resources: ["roles", "rolebindings"]
    verbs: ["get", "create", "patch", "delete"]
  # serving pools
  - apiGroups: ["apps"]
    resources: ["deployments"]
    verbs: ["get", "list", "create", "patch", "delete"]
  - apiGroups: ["policy"]
    resources: ["poddisruptionbudgets"]
    verbs: ["get", "create", "patch", "delete"]
  # gang scheduling: Kueue Workloads (watched: admission and eviction reconcile the job at once),
  # Volcano / scheduler-plugins PodGroups
  - apiGroups: ["kueue.x-k8s.io"]
    resources: ["workloads"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  - apiGroups: ["kueue.x-k8s.io"]
    resources: ["workloads/status"]
    verbs: ["patch"]
  # the job's queue: the namespace's `default` LocalQueue (Kueue's LocalQueue defaulting)
  - apiGroups: ["kueue.x-k8s.io"]
    resources: ["localqueues"]
    verbs: ["get"]
  - apiGroups: ["scheduling.volcano.sh", "scheduling.x-k8s.io"]
    resources: ["podgroups"]
    verbs: ["get", "create", "patch", "delete"]
{{- end }}
