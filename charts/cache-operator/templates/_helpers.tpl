{{/* Names and labels shared by every template of the chart. */}}

{{- define "cache-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already says cache-operator. */}}
{{- define "cache-operator.fullname" -}}
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

{{/* Labels of every object of the release; the operator's own carry the component too. */}}
{{- define "cache-operator.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cache-operator.labels" -}}
{{ include "cache-operator.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* What the Deployment and the Service select: the operator's pod, never a test pod. */}}
{{- define "cache-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "cache-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cache-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cache-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The server image for CacheClusters that name none: the same image unless overridden. */}}
{{- define "cache-operator.applianceImage" -}}
{{- default (include "cache-operator.image" .) .Values.operator.defaultApplianceImage }}
{{- end }}

{{/* The liveness URL inside the cluster, through the operator's Service. */}}
{{- define "cache-operator.livenessURL" -}}
{{- printf "http://%s.%s.svc:%d%s" (include "cache-operator.fullname" .) .Release.Namespace (int .Values.liveness.port) .Values.liveness.path }}
{{- end }}
