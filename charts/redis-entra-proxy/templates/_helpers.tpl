{{/*
The chart's name, truncated to 63 characters (a DNS label).
*/}}
{{- define "rep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: "<release>-<chart>", or just the release name when it already contains
the chart name. Truncated to 52 characters so that suffixes such as "-injector" still fit in 63.
*/}}
{{- define "rep.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the injector's objects. */}}
{{- define "rep.injector.fullname" -}}
{{- printf "%s-injector" (include "rep.fullname" .) }}
{{- end }}

{{- define "rep.injector.serviceAccountName" -}}
{{- if .Values.injector.serviceAccount.create }}
{{- default (include "rep.injector.fullname" .) .Values.injector.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.injector.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the webhook's serving certificate (tls.crt, tls.key; ca.crt). */}}
{{- define "rep.injector.tlsSecretName" -}}
{{- printf "%s-tls" (include "rep.injector.fullname" .) }}
{{- end }}

{{/* Names of the gateway's objects. */}}
{{- define "rep.gateway.fullname" -}}
{{- include "rep.fullname" . }}
{{- end }}

{{- define "rep.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "rep.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Chart label value: name-version. */}}
{{- define "rep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "injector").
*/}}
{{- define "rep.labels" -}}
helm.sh/chart: {{ include "rep.chart" .ctx }}
{{ include "rep.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* Selector labels (immutable in a Deployment: never add to them). */}}
{{- define "rep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rep.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The proxy image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "rep.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The injector's defaults file (JSON). Only the fields the injector knows are rendered (it rejects
unknown ones); empty strings are left out, so the injector's own defaults apply. image and
imagePullPolicy default to the chart's image. toJson sorts the keys: the output is stable, and
so is the checksum annotation computed from it.
*/}}
{{- define "rep.injector.defaultsJson" -}}
{{- $d := .Values.injector.defaults }}
{{- $out := dict "image" (default (include "rep.image" .) $d.image) "imagePullPolicy" (default .Values.image.pullPolicy $d.imagePullPolicy) }}
{{- range $key := list "upstream" "clientId" "listen" "auth" "accessKeySecret" "listenPasswordSecret" "logFormat" "cluster" "clusterPorts" }}
{{- with index $d $key }}
{{- $_ := set $out $key . }}
{{- end }}
{{- end }}
{{- range $key := list "database" "maxConnections" "clusterMaxNodes" "multiplex" "adminPort" }}
{{- if not (kindIs "invalid" (index $d $key)) }}
{{- $_ := set $out $key (int (index $d $key)) }}
{{- end }}
{{- end }}
{{- with $d.resources }}
{{- $_ := set $out "resources" . }}
{{- end }}
{{- toPrettyJson $out }}
{{- end }}

{{/*
The default --max-connections for a memory limit (a Kubernetes quantity, or empty): what the
limit holds if every client connection costs the worst case measured with bench/ (2 MiB), after
16 MiB for the process itself; at least 1; 0 (no limit) without a memory limit. The injector
derives the sidecar's the same way (src/injector/sidecar.rs, max_connections_for).
*/}}
{{- define "rep.maxConnectionsFor" -}}
{{- $q := toString . }}
{{- if or (not .) (eq $q "<nil>") }}0
{{- else }}
{{- $units := dict "" 1 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $bytes := mulf (float64 $number) (float64 (get $units (trimPrefix $number $q))) }}
{{- max 1 (int64 (floor (divf (subf $bytes 16777216) 2097152))) }}
{{- end }}
{{- end }}

{{/* The locked-down container securityContext of every container the chart runs. */}}
{{- define "rep.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Preferred pod anti-affinity on the node: replicas spread over nodes when they can, so that one
node going down doesn't take every replica with it. Call with (dict "ctx" $ "component" "x").
*/}}
{{- define "rep.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "rep.selectorLabels" . | nindent 12 }}
{{- end }}
