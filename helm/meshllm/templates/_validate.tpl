{{/* Mistakes in values that the schema cannot express; each names the value to fix. */}}
{{- define "meshllm.validate" -}}
{{- $tls := .Values.tls }}
{{- if and $tls.router.enabled (not $tls.router.secretName) }}
{{- fail "tls.router.enabled needs tls.router.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and $tls.router.clientCASecret (not $tls.router.enabled) }}
{{- fail "tls.router.clientCASecret (mutual TLS) needs tls.router.enabled" }}
{{- end }}
{{- if and $tls.replicas.enabled (not $tls.replicas.secretName) }}
{{- fail "tls.replicas.enabled needs tls.replicas.secretName (a kubernetes.io/tls Secret with ca.crt)" }}
{{- end }}
{{- if and $tls.replicas.routerClientSecret (not $tls.replicas.enabled) }}
{{- fail "tls.replicas.routerClientSecret (mutual TLS) needs tls.replicas.enabled" }}
{{- end }}
{{- if and (eq .Values.auth.mode "none") (or .Values.auth.existingSecret .Values.auth.tenants) }}
{{- fail "auth.mode=none ignores tenants: remove auth.existingSecret / auth.tenants, or use auth.mode=api-key" }}
{{- end }}
{{- if and .Values.auth.existingSecret .Values.auth.tenants }}
{{- fail "give tenants either in auth.existingSecret or in auth.tenants, not both" }}
{{- end }}
{{- range $i, $t := .Values.auth.tenants }}
{{- range $j, $key := $t.keys }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" $key) }}
{{- fail (printf "auth.tenants[%d].keys[%d] must be 'sha256:<64 lowercase hex digits>': store the key's hash (meshllm-router hash-key), never the key" $i $j) }}
{{- end }}
{{- end }}
{{- end }}
{{- $sources := 0 }}
{{- if .Values.redis.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.bundled.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt $sources 1 }}
{{- fail "give Redis one way: redis.url, redis.existingSecret or redis.bundled.enabled" }}
{{- end }}
{{- $ids := list }}
{{- range $i, $m := .Values.catalog }}
{{- if has $m.id $ids }}
{{- fail (printf "catalog[%d]: model id %q appears twice" $i $m.id) }}
{{- end }}
{{- $ids = append $ids $m.id }}
{{- end }}
{{- if .Values.serviceMonitor.enabled }}
{{- if not (or .Values.router.metrics.enabled .Values.replica.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs router.metrics.enabled or replica.metrics.enabled: there is nothing to scrape" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.metricsFrom) }}
{{- fail "serviceMonitor.enabled with networkPolicy.enabled needs networkPolicy.metricsFrom (who scrapes, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]): the policy closes the metrics ports to everyone else" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.replica.modelStorage.type "pvc") (not .Values.replica.modelStorage.pvc.existingClaim) (not .Values.replica.modelStorage.pvc.size) }}
{{- fail "replica.modelStorage.pvc needs existingClaim or a size for a new claim" }}
{{- end }}
{{- end }}
