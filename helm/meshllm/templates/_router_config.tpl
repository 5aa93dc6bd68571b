{{/*
The router's TOML config: a [router] table (RouterConfig settings by their flat names, which the
router places in its sub-tables) and one [models.<id>] table per
catalog entry. The router loads it with `meshllm-router --config`; tests/e2e/test_helm.py loads the
rendered file with the router's own loader.
*/}}
{{- define "meshllm.managedRouterSettings" -}}
host port dns metrics_port health_port auth tenants_file quota_store redis_url redis_url_file share_placement_counts drain_grace_s tls_cert tls_key tls_client_ca replica_tls_ca replica_tls_cert replica_tls_key replica_tls_server_name models
{{- end }}

{{- define "meshllm.routerToml" -}}
{{- $managed := splitList " " (include "meshllm.managedRouterSettings" .) }}
{{- range $key, $_ := .Values.router.config }}
{{- if has $key $managed }}
{{- fail (printf "router.config.%s is set by the chart from other values (docs/kubernetes.md): remove it" $key) }}
{{- end }}
{{- end }}
{{- $tls := .Values.tls -}}
# Rendered by the meshllm Helm chart from its values; read by `meshllm-router --config`.
[router]
host = "0.0.0.0"
port = {{ int .Values.router.port }}
dns = {{ printf "%s:%d" (include "meshllm.replicasHost" .) (int .Values.replica.port) | toJson }}
drain_grace_s = {{ include "meshllm.tomlValue" .Values.router.drainGraceSeconds }}
auth = {{ toJson .Values.auth.mode }}
{{- if eq .Values.auth.mode "api-key" }}
tenants_file = {{ include "meshllm.tenantsPath" . | toJson }}
{{- end }}
quota_store = {{ include "meshllm.quotaStore" . | toJson }}
{{- if eq (include "meshllm.quotaStore" .) "redis" }}
redis_url_file = "/etc/meshllm/redis/url"
share_placement_counts = true
{{- end }}
{{- if .Values.router.metrics.enabled }}
metrics_port = {{ int .Values.router.metrics.port }}
{{- end }}
{{- if $tls.router.enabled }}
tls_cert = "/etc/meshllm/tls/server/tls.crt"
tls_key = "/etc/meshllm/tls/server/tls.key"
health_port = {{ int .Values.router.healthPort }}
{{- if $tls.router.clientCASecret }}
tls_client_ca = "/etc/meshllm/tls/client-ca/ca.crt"
{{- end }}
{{- end }}
{{- if $tls.replicas.enabled }}
replica_tls_ca = "/etc/meshllm/tls/replica-ca/ca.crt"
replica_tls_server_name = {{ default (include "meshllm.replicasHost" .) $tls.replicas.serverName | toJson }}
{{- if $tls.replicas.routerClientSecret }}
replica_tls_cert = "/etc/meshllm/tls/replica-client/tls.crt"
replica_tls_key = "/etc/meshllm/tls/replica-client/tls.key"
{{- end }}
{{- end }}
{{- include "meshllm.tomlPairs" .Values.router.config }}
{{- range $model := .Values.catalog }}

[models.{{ include "meshllm.tomlKey" $model.id }}]
{{- include "meshllm.tomlPairs" (omit $model "id" "options") }}
{{- with $model.options }}

[models.{{ include "meshllm.tomlKey" $model.id }}.options]
{{- include "meshllm.tomlPairs" . }}
{{- end }}
{{- end }}
{{ end }}
