{{- define "tuneloom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; `tuneloom` alone when the release is called that. */}}
{{- define "tuneloom.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "tuneloom.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "tuneloom.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "tuneloom.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tuneloom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tuneloom
{{- end }}

{{- define "tuneloom.operatorLabels" -}}
{{ include "tuneloom.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tuneloom.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tuneloom.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "tuneloom.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag of one entry of .Values.images; call with (list $ "trainer"). */}}
{{- define "tuneloom.image" -}}
{{- $root := index . 0 }}
{{- $image := index $root.Values.images (index . 1) }}
{{- printf "%s:%v" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "tuneloom.apiLabels" -}}
{{ include "tuneloom.labels" . }}
app.kubernetes.io/component: api
{{- end }}

{{- define "tuneloom.apiSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{- define "tuneloom.apiServiceAccountName" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (printf "%s-api" (include "tuneloom.fullname" .)) .Values.api.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}
