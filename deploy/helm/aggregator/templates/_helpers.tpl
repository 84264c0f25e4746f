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

{{/*
The config file: .Values.config with server.address and server.metrics_address set from
.Values.port and .Values.metricsPort, so the container ports, the probes and the listeners
always agree.
*/}}
{{- define "aggregator.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "address" (printf "[::]:%d" (int .Values.port)) }}
{{- if gt (int .Values.metricsPort) 0 }}
{{- $_ := set $server "metrics_address" (printf "0.0.0.0:%d" (int .Values.metricsPort)) }}
{{- else }}
{{- $_ := set $server "metrics_address" "" }}
{{- end }}
{{- $_ := set $config "server" $server }}
{{- toYaml $config }}
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
