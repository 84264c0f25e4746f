{{/* Chart name, truncated to a DNS label. */}}
{{- define "aggregator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "aggregator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "aggregator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "aggregator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "aggregator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aggregator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "aggregator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "aggregator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Where the pod finds its files. */}}
{{- define "aggregator.configDir" -}}/etc/aggregator/config{{- end }}
{{- define "aggregator.tlsDir" -}}/etc/aggregator/tls{{- end }}
{{- define "aggregator.clientCADir" -}}/etc/aggregator/client-ca{{- end }}

{{- define "aggregator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aggregator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The port the gRPC probes call: the plaintext health-only port when TLS is on. */}}
{{- define "aggregator.probePort" -}}
{{- if .Values.tls.enabled }}{{ int .Values.healthPort }}{{ else }}{{ int .Values.port }}{{ end }}
{{- end }}

{{/*
The config file: .Values.config with the keys the chart owns written from the values, so the
listeners, the container ports, the probes and the mounted files always agree:
server.address (port), server.metrics_address (metricsPort), server.admin_address (adminPort,
on the pod's loopback only), and with tls.enabled
server.tls (the mounted Secret) and server.health_address (healthPort).
*/}}
{{- define "aggregator.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $server := get $config "server" | default dict }}
{{- if and (hasKey $server "tls") (not .Values.tls.enabled) }}
{{- fail "config.server.tls: set tls.enabled and tls.secretName instead (the chart mounts the Secret and moves the probes to healthPort)" }}
{{- end }}
{{- $_ := set $server "address" (printf "[::]:%d" (int .Values.port)) }}
{{- if gt (int .Values.metricsPort) 0 }}
{{- $_ := set $server "metrics_address" (printf "0.0.0.0:%d" (int .Values.metricsPort)) }}
{{- else }}
{{- $_ := set $server "metrics_address" "" }}
{{- end }}
{{- if gt (int .Values.adminPort) 0 }}
{{- $_ := set $server "admin_address" (printf "127.0.0.1:%d" (int .Values.adminPort)) }}
{{- else }}
{{- $_ := set $server "admin_address" "" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.secretName: required when tls.enabled (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if eq (int .Values.healthPort) (int .Values.port) }}
{{- fail "healthPort: must differ from port (it serves plaintext health checks beside the TLS port)" }}
{{- end }}
{{- $tls := dict "cert" (printf "%s/tls.crt" (include "aggregator.tlsDir" .)) "key" (printf "%s/tls.key" (include "aggregator.tlsDir" .)) }}
{{- if .Values.tls.clientCA.enabled }}
{{- $_ := set $tls "client_ca" (printf "%s/%s" (include "aggregator.clientCADir" .) .Values.tls.clientCA.key) }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- $_ := set $server "health_address" (printf "[::]:%d" (int .Values.healthPort)) }}
{{- else }}
{{- $_ := unset $server "health_address" }}
{{- end }}
{{- $_ := set $config "server" $server }}
{{- toYaml $config }}
{{- end }}

{{/*
The keys of the config the server reads only when it starts (RESTART_KEYS and callers' quotas
in aggregator/reload.py): with configChanges "reload", a change of one of these rolls the pods,
and the server reloads any other change by itself.
*/}}
{{- define "aggregator.configReadAtStart" -}}
{{- $config := include "aggregator.config" . | fromYaml }}
{{- $server := pick (get $config "server" | default dict) "address" "health_address" "metrics_address" "admin_address" "workers" "tls" "event_loop" "max_request_bytes" "max_upstream_inflight" "admin_recent" "admin_hosts" "admin_allow_remote" "log_format" }}
{{- $quotas := dict }}
{{- range $name, $caller := (get (get $config "auth" | default dict) "callers" | default dict) }}
{{- $quota := pick $caller "rate_limit" "max_concurrent_calls" }}
{{- if $quota }}{{- $_ := set $quotas $name $quota }}{{- end }}
{{- end }}
{{- toYaml (dict "server" $server "tracing" (get $config "tracing") "limits" (get $config "limits") "quotas" $quotas) }}
{{- end }}

{{/*
Seconds in a duration string as the service reads it ("250ms", "2s", "1m", "1h").
*/}}
{{- define "aggregator.seconds" -}}
{{- $text := trim (toString .) }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- $unit := trim (trimPrefix $number $text) }}
{{- $scale := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 }}
{{- if not (and $number (hasKey $scale $unit)) }}
{{- fail (printf "%q is not a duration (use 250ms, 2s, 1m)" $text) }}
{{- end }}
{{- mulf (float64 $number) (get $scale $unit) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then server.shutdown_grace for in-flight
calls, then 5 s for the process to exit; an explicit value must leave room for the first two.
*/}}
{{- define "aggregator.terminationGracePeriodSeconds" -}}
{{- $server := (.Values.config | default dict).server | default dict }}
{{- $grace := include "aggregator.seconds" ($server.shutdown_grace | default "10s") | float64 }}
{{- $needed := addf $grace (.Values.preStopSleepSeconds | default 0) }}
{{- $explicit := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $explicit }}
{{- add (ceil $needed | int) 5 }}
{{- else if le (float64 $explicit) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than preStopSleepSeconds + config.server.shutdown_grace (%v s)" $explicit $needed) }}
{{- else }}
{{- int $explicit }}
{{- end }}
{{- end }}

{{/* The headless Service's name: the full name, room kept for the suffix. */}}
{{- define "aggregator.headlessName" -}}
{{- printf "%s-headless" (include "aggregator.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The image both containers run. */}}
{{- define "aggregator.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}
{{- end }}

{{/* The files the server reads, mounted alike in the check-config init container. */}}
{{- define "aggregator.volumeMounts" -}}
- name: config
  mountPath: {{ include "aggregator.configDir" . }}
  readOnly: true
{{- if .Values.tls.enabled }}
# Whole directories, never subPath: Secret updates (renewed certificates) only
# reach directory mounts, and the server reloads the files when they change.
- name: tls
  mountPath: {{ include "aggregator.tlsDir" . }}
  readOnly: true
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  mountPath: {{ include "aggregator.clientCADir" . }}
  readOnly: true
{{- end }}
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The helm test pod's labels: this release's, but never the Services' or the PDB's selector. */}}
{{- define "aggregator.testLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "aggregator.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
