{{/* Names and labels */}}
{{- define "meshllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshllm.fullname" -}}
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

{{- define "meshllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "meshllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshllm
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "router") */}}
{{- define "meshllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshllm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meshllm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshllm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "image" .Values.router.image "root" $); a digest wins over a tag */}}
{{- define "meshllm.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* Where the router finds replicas: the headless Service's DNS name */}}
{{- define "meshllm.replicasService" -}}
{{ include "meshllm.fullname" . }}-replicas
{{- end }}

{{- define "meshllm.replicasHost" -}}
{{ include "meshllm.replicasService" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end }}

{{/* "true" when routers get a Redis URL (external, existing Secret or bundled), else "" */}}
{{- define "meshllm.redisConfigured" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.bundled.enabled }}true{{ end }}
{{- end }}

{{/* The quota store the routers use: memory or redis (fails on several routers without Redis) */}}
{{- define "meshllm.quotaStore" -}}
{{- $store := .Values.quota.store }}
{{- $several := or (gt (int .Values.router.replicas) 1) .Values.router.autoscaling.enabled }}
{{- if eq $store "auto" }}
{{- if include "meshllm.redisConfigured" . }}redis
{{- else if and $several (eq .Values.auth.mode "api-key") }}
{{- fail "several routers (router.replicas > 1 or router.autoscaling.enabled) need Redis to share quota counters: set redis.url, redis.existingSecret or redis.bundled.enabled=true (or quota.store=memory to let each router enforce the limits on its own)" }}
{{- else }}memory
{{- end }}
{{- else if eq $store "redis" }}
{{- if not (include "meshllm.redisConfigured" .) }}
{{- fail "quota.store=redis needs redis.url, redis.existingSecret or redis.bundled.enabled=true" }}
{{- end }}redis
{{- else }}{{ $store }}
{{- end }}
{{- end }}

{{/* The Secret and key that hold the Redis URL */}}
{{- define "meshllm.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecret }}{{ else }}{{ include "meshllm.fullname" . }}-redis{{ end }}
{{- end }}

{{- define "meshllm.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{- define "meshllm.tenantsSecretName" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else }}{{ include "meshllm.fullname" . }}-tenants{{ end }}
{{- end }}

{{/*
A TOML value. A JSON string is a valid TOML basic string (same escapes, \uXXXX included), so
strings and lists go through toJson. Helm holds every number as float64: integral ones are
written as integers (toToml would write 2.0, which the router refuses for an integer setting).
*/}}
{{- define "meshllm.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "meshllm.tomlValue" $v }}{{ end }}]
{{- else }}{{ fail (printf "cannot write %v (%s) as a TOML value" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, else quoted */}}
{{- define "meshllm.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* key = value lines of a map, sorted by key, null values left out */}}
{{- define "meshllm.tomlPairs" -}}
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
{{ include "meshllm.tomlKey" $key }} = {{ include "meshllm.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* Files mounted into router pods */}}
{{- define "meshllm.routerConfigPath" -}}/etc/meshllm/config/router.toml{{- end }}
{{- define "meshllm.tenantsPath" -}}/etc/meshllm/tenants/tenants.toml{{- end }}

{{/* Probes: native gRPC on the overall health service "", on the main port where the server
speaks plaintext, else on its plaintext health-only port (kubelet gRPC probes cannot do TLS). */}}
{{- define "meshllm.probeAction" -}}
grpc:
  port: {{ if .tls }}{{ .healthPort }}{{ else }}{{ .port }}{{ end }}
  service: ""
{{- end }}

{{/* The container port of the plaintext health-only server, where TLS is on */}}
{{- define "meshllm.healthContainerPort" -}}
{{- if .tls }}
- name: health
  containerPort: {{ .healthPort }}
  protocol: TCP
{{- end }}
{{- end }}

{{- define "meshllm.probes" -}}
startupProbe:
  {{- include "meshllm.probeAction" . | trim | nindent 2 }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  {{- include "meshllm.probeAction" . | trim | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  {{- include "meshllm.probeAction" . | trim | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end }}

{{- define "meshllm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
