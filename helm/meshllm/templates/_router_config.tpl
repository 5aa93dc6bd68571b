{{/*
The router's TOML config: a [router] table with the router's own settings, its sub-tables
([router.discovery], [router.quota], [router.redis], [router.placement], [router.http],
[router.outliers], [router.tls], [router.replica_tls]) and one [models.<id>] table per catalog entry. router.config takes settings
by their flat names (the router's FLAT_NAMES, as its flags name them: stale_after_s, quota_lease_s,
redis_timeout_s, placement_refresh_s); meshllm.routerFlatNames places each in its sub-table. The
router loads the file with `meshllm-router --config`; tests/e2e/test_helm.py loads the rendered
file with the router's own loader and pins meshllm.routerFlatNames to FLAT_NAMES.
*/}}
{{- define "meshllm.managedRouterSettings" -}}
host port dns metrics_port health_port http_port auth tenants_file quota_store redis_url redis_url_file share_placement_counts drain_grace_s tls_cert tls_key tls_client_ca replica_tls_ca replica_tls_cert replica_tls_key replica_tls_server_name models
{{- end }}

{{/* Flat name: sub-table.setting (the router's FLAT_NAMES); other names are [router]'s own */}}
{{- define "meshllm.routerFlatNames" -}}
replicas: discovery.replicas
replicas_file: discovery.replicas_file
dns: discovery.dns
refresh_s: discovery.refresh_s
report_interval_ms: discovery.report_interval_ms
stale_after_s: discovery.stale_after_s
reconnect_max_s: discovery.reconnect_max_s
quota_store: quota.store
redis_unavailable: quota.unavailable
quota_lease_s: quota.lease_s
redis_url: redis.url
redis_url_file: redis.url_file
redis_timeout_s: redis.timeout_s
load_timeout_s: placement.load_timeout_s
load_retry_s: placement.load_retry_s
unload_drain_s: placement.unload_drain_s
placement_refresh_s: placement.refresh_s
share_placement_counts: placement.share_counts
http_port: http.port
http_max_body_bytes: http.max_body_bytes
http_timeout_s: http.timeout_s
fair_queue: queue.enabled
replica_queue: queue.replica_queue
queue_reserve: queue.reserve
queue_max_queued: queue.max_queued
queue_max_wait_s: queue.max_wait_s
queue_max_total: queue.max_total
queue_share_interval_s: queue.share_interval_s
outlier_ejection: outliers.enabled
outlier_window_s: outliers.window_s
outlier_min_requests: outliers.min_requests
outlier_failure_rate: outliers.failure_rate
outlier_consecutive_failures: outliers.consecutive_failures
outlier_base_ejection_s: outliers.base_ejection_s
outlier_max_ejection_s: outliers.max_ejection_s
outlier_max_ejected_percent: outliers.max_ejected_percent
outlier_ramp_s: outliers.ramp_s
tls_cert: tls.cert
tls_key: tls.key
tls_client_ca: tls.client_ca
replica_tls_ca: replica_tls.ca
replica_tls_cert: replica_tls.cert
replica_tls_key: replica_tls.key
replica_tls_server_name: replica_tls.server_name
{{- end }}

{{- define "meshllm.routerToml" -}}
{{- $managed := splitList " " (include "meshllm.managedRouterSettings" .) }}
{{- $flatNames := include "meshllm.routerFlatNames" . | fromYaml }}
{{- $order := list "discovery" "quota" "redis" "placement" "http" "queue" "outliers" "tls" "replica_tls" }}
{{- $router := dict }}
{{- $sections := dict }}
{{- range $name := $order }}{{ $_ := set $sections $name dict }}{{ end }}
{{- range $key, $value := .Values.router.config }}
{{- if has $key $managed }}
{{- fail (printf "router.config.%s is set by the chart from other values (docs/kubernetes.md): remove it" $key) }}
{{- end }}
{{- if hasKey $flatNames $key }}
{{- $place := splitList "." (get $flatNames $key) }}
{{- $_ := set (get $sections (first $place)) (last $place) $value }}
{{- else }}
{{- $_ := set $router $key $value }}
{{- end }}
{{- end }}
{{- $tls := .Values.tls }}
{{- $store := include "meshllm.quotaStore" . }}
{{- $_ := set $router "host" "0.0.0.0" }}
{{- $_ = set $router "port" (int .Values.router.port) }}
{{- $_ = set $router "drain_grace_s" .Values.router.drainGraceSeconds }}
{{- $_ = set $router "auth" .Values.auth.mode }}
{{- if eq .Values.auth.mode "api-key" }}
{{- $_ = set $router "tenants_file" (include "meshllm.tenantsPath" .) }}
{{- end }}
{{- if .Values.router.metrics.enabled }}
{{- $_ = set $router "metrics_port" (int .Values.router.metrics.port) }}
{{- end }}
{{- if .Values.router.http.enabled }}
{{- $_ = set $sections.http "port" (int .Values.router.http.port) }}
{{- end }}
{{- $_ = set $sections.discovery "dns" (printf "%s:%d" (include "meshllm.replicasHost" .) (int .Values.replica.port)) }}
{{- $_ = set $sections.quota "store" $store }}
{{- if eq $store "redis" }}
{{- $_ = set $sections.redis "url_file" "/etc/meshllm/redis/url" }}
{{- /* the chart shares desired replica counts through the Redis it shares quotas through */}}
{{- $_ = set $sections.placement "share_counts" true }}
{{- end }}
{{- if $tls.router.enabled }}
{{- $_ = set $router "health_port" (int .Values.router.healthPort) }}
{{- $_ = set $sections.tls "cert" "/etc/meshllm/tls/server/tls.crt" }}
{{- $_ = set $sections.tls "key" "/etc/meshllm/tls/server/tls.key" }}
{{- if $tls.router.clientCASecret }}
{{- $_ = set $sections.tls "client_ca" "/etc/meshllm/tls/client-ca/ca.crt" }}
{{- end }}
{{- end }}
{{- if $tls.replicas.enabled }}
{{- $_ = set $sections.replica_tls "ca" "/etc/meshllm/tls/replica-ca/ca.crt" }}
{{- $_ = set $sections.replica_tls "server_name" (default (include "meshllm.replicasHost" .) $tls.replicas.serverName) }}
{{- if $tls.replicas.routerClientSecret }}
{{- $_ = set $sections.replica_tls "cert" "/etc/meshllm/tls/replica-client/tls.crt" }}
{{- $_ = set $sections.replica_tls "key" "/etc/meshllm/tls/replica-client/tls.key" }}
{{- end }}
{{- end -}}
# Rendered by the meshllm Helm chart from its values; read by `meshllm-router --config`.
[router]
{{- include "meshllm.tomlPairs" $router }}
{{- range $name := $order }}
{{- with get $sections $name }}

[router.{{ $name }}]
{{- include "meshllm.tomlPairs" . }}
{{- end }}
{{- end }}
{{- range $model := .Values.catalog }}

[models.{{ include "meshllm.tomlKey" $model.id }}]
{{- include "meshllm.tomlPairs" (omit $model "id" "options") }}
{{- with $model.options }}

[models.{{ include "meshllm.tomlKey" $model.id }}.options]
{{- include "meshllm.tomlPairs" . }}
{{- end }}
{{- end }}
{{ end }}
