{{/*
Expand the name of the chart.
*/}}
{{- define "optimenv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, at most 63 characters (DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "optimenv.fullname" -}}
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
Chart name and version as used by the chart label.
*/}}
{{- define "optimenv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "optimenv.labels" -}}
helm.sh/chart: {{ include "optimenv.chart" . }}
{{ include "optimenv.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "optimenv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "optimenv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The controller's ServiceAccount.
*/}}
{{- define "optimenv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "optimenv.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespaces watched in namespaced mode, as a JSON list (the release namespace when none given).
*/}}
{{- define "optimenv.watchedNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
The controller's RBAC rules: only the verbs it uses, no wildcards, no Secrets.
*/}}
{{- define "optimenv.rules" -}}
# OptimEnvs: listed and watched into the controller's cache (nothing is kept on the objects).
- apiGroups: ["optimenv.dev"]
  resources: ["optimenvs"]
  verbs: ["list", "watch"]
# Status is written through the status subresource (a merge patch).
- apiGroups: ["optimenv.dev"]
  resources: ["optimenvs/status"]
  verbs: ["patch"]
# Setting blockOwnerDeletion on a child's ownerReference needs update on the owner's finalizers
# where the OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: ["optimenv.dev"]
  resources: ["optimenvs/finalizers"]
  verbs: ["update"]
# The env/spec/DeepSpeed ConfigMaps (created, then server-side applied), and the referenced config
# ConfigMap (read; watched, so a change of it reconciles). get: the referenced one, and the holder
# of a name a create found taken. Garbage collection deletes the children, never the controller.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Events: children created again or updated, the job's phase changes, warnings (kopf posts none).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- /* The owned job: created, then server-side applied, listed and watched (the controller runs
with --job-kind for each) so that drift is repaired and its phase reported at once; get: the holder
of a name a create found taken. */}}
{{- if .Values.jobs.enabled }}
{{- if has "rayjob" .Values.jobs.targets }}
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
{{- if has "pytorchjob" .Values.jobs.targets }}
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
{{- if has "trainjob" .Values.jobs.targets }}
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- end }}
{{- end }}
{{- end }}
