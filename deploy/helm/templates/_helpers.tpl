{{/*
Names, labels, addresses and pod fragments shared by the role templates.
*/}}

{{- define "megascale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-CHART, or RELEASE when it already contains the chart name; <= 40 characters so
that "-attention-NNN" suffixes and the pod-name hash still fit in 63. */}}
{{- define "megascale.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Object name of a role: (dict "root" $ "role" "expert") */}}
{{- define "megascale.roleName" -}}
{{- printf "%s-%s" (include "megascale.fullname" .root) .role }}
{{- end }}

{{- define "megascale.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/name: {{ include "megascale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: megascale-infer
{{- end }}

{{/* Selector labels of a role: (dict "root" $ "role" "expert") */}}
{{- define "megascale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "megascale.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/* image: the role's override merged over the global image. (dict "root" $ "role" "expert") */}}
{{- define "megascale.image" -}}
{{- $v := .root.Values -}}
{{- $img := merge (deepCopy (default (dict) (index $v .role).image)) (deepCopy $v.image) -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion ($img.tag | toString)) }}
{{- end }}

{{- define "megascale.pullPolicy" -}}
{{- $v := .root.Values -}}
{{- default $v.image.pullPolicy (default (dict) (index $v .role).image).pullPolicy }}
{{- end }}

{{/* host:port of the scheduler's gRPC Service, which every role dials. */}}
{{- define "megascale.schedulerAddress" -}}
{{- printf "%s.%s.svc.%s:%v" (include "megascale.roleName" (dict "root" . "role" "scheduler")) .Release.Namespace .Values.clusterDomain .Values.scheduler.grpcPort }}
{{- end }}

{{- define "megascale.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc.%s:%v/0" (include "megascale.roleName" (dict "root" . "role" "redis")) .Release.Namespace .Values.clusterDomain .Values.redis.port }}
{{- else }}
{{- required "redis.url is required when redis.enabled is false (e.g. redis://my-redis:6379/0)" .Values.redis.url }}
{{- end }}
{{- end }}

{{/* The expert nodes' gRPC addresses, comma separated: one per StatefulSet pod, through the
headless Service (stable DNS names, so the list is known before the pods exist). */}}
{{- define "megascale.expertNodes" -}}
{{- $sts := include "megascale.roleName" (dict "root" . "role" "expert") }}
{{- $nodes := list }}
{{- range $i := until (int .Values.expert.replicas) }}
{{- $nodes = append $nodes (printf "%s-%d.%s.%s.svc.%s:%v" $sts $i $sts $.Release.Namespace $.Values.clusterDomain $.Values.expert.grpcPort) }}
{{- end }}
{{- join "," $nodes }}
{{- end }}

{{/* Fails the render with one clear line when the values cannot work. */}}
{{- define "megascale.validate" -}}
{{- $v := .Values }}
{{- if not (has $v.model.source (list "demo" "pvc" "hostPath")) }}
{{- fail (printf "model.source must be demo, pvc or hostPath, got %q" (toString $v.model.source)) }}
{{- end }}
{{- if lt (int $v.expert.replicas) 1 }}
{{- fail (printf "expert.replicas must be >= 1, got %v" $v.expert.replicas) }}
{{- end }}
{{- if and (eq $v.model.source "demo") (gt (int $v.expert.replicas) (int $v.model.demo.experts)) }}
{{- fail (printf "expert.replicas (%v) must be <= model.demo.experts (%v): each expert node needs at least one expert" $v.expert.replicas $v.model.demo.experts) }}
{{- end }}
{{- if lt (int $v.attention.replicas) 1 }}
{{- fail (printf "attention.replicas must be >= 1, got %v" $v.attention.replicas) }}
{{- end }}
{{- $tls := $v.security.tlsSecrets }}
{{- $named := 0 }}
{{- range $role := list "scheduler" "attention" "expert" "gateway" }}
{{- if index $tls $role }}{{ $named = add1 $named }}{{ end }}
{{- end }}
{{- if and (gt $named 0) (lt $named 4) }}
{{- fail "security.tlsSecrets must name a Secret for all four roles (scheduler, attention, expert, gateway) or for none" }}
{{- end }}
{{- if lt (int $v.attention.microBatches) 1 }}
{{- fail (printf "attention.microBatches must be >= 1, got %v" $v.attention.microBatches) }}
{{- end }}
{{- end }}

{{/* Downward-API env every role gets first, so later values can use $(POD_NAME) etc. The
internal roles bind the pod IP (what Services, probes and peers dial), never 0.0.0.0; the
gateway, the public front, binds every address so that `kubectl port-forward` reaches it. */}}
{{- define "megascale.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: MEGASCALE_NODE_ID
  value: "$(POD_NAME)"
- name: MEGASCALE_HOST
  value: {{ if .public }}"0.0.0.0"{{ else }}"$(POD_IP)"{{ end }}
{{- end }}

{{/* Env after the role's own: log level, common env, the role's extra env. (dict "root" $ "role" "expert") */}}
{{- define "megascale.extraEnv" -}}
{{- $v := .root.Values }}
{{- $r := index $v .role }}
- name: MEGASCALE_LOG_LEVEL
  value: {{ default $v.common.logLevel $r.logLevel | quote }}
{{- with $v.common.env }}
{{ toYaml . }}
{{- end }}
{{- with $r.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model volume: (dict "root" $) */}}
{{- define "megascale.modelVolume" -}}
{{- $m := .root.Values.model }}
- name: model
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" $m.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "megascale.modelMount" -}}
- name: model
  mountPath: /model
  readOnly: true
{{- with .root.Values.model.pvc.subPath }}
{{- if eq $.root.Values.model.source "pvc" }}
  subPath: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The demo init container writing the deterministic random checkpoint into /model. */}}
{{- define "megascale.modelInit" -}}
{{- $v := .root.Values }}
{{- if eq $v.model.source "demo" }}
initContainers:
  - name: demo-model
    image: {{ include "megascale.image" . }}
    imagePullPolicy: {{ include "megascale.pullPolicy" . }}
    command: {{ toJson $v.command }}
    args:
      - demo-model
      - --out
      - /model
      - --experts
      - {{ $v.model.demo.experts | quote }}
      - --layers
      - {{ $v.model.demo.layers | quote }}
      - --hidden
      - {{ $v.model.demo.hidden | quote }}
      - --seed
      - {{ $v.model.demo.seed | quote }}
      {{- range $v.model.demo.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    env:
      - name: MEGASCALE_TORCH_THREADS
        value: "1"
    {{- with $v.model.demo.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: model
        mountPath: /model
{{- end }}
{{- end }}

{{/* Pod annotations: Prometheus scrape + common + role. (dict "root" $ "role" "expert" "port" 9090) */}}
{{- define "megascale.podAnnotations" -}}
{{- $v := .root.Values }}
{{- if $v.common.prometheusScrape }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with $v.common.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with (index $v .role).podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* nodeSelector / tolerations / affinity / pull secrets of a role's pod spec. */}}
{{- define "megascale.scheduling" -}}
{{- $v := .root.Values }}
{{- $r := index $v .role }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $r.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $r.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $r.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* gRPC startup/readiness/liveness probes on the standard grpc.health.v1 service. */}}
{{- define "megascale.grpcProbes" -}}
{{- $sp := .root.Values.common.startupProbe }}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $sp.periodSeconds }}
  failureThreshold: {{ $sp.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}

{{/* An autoscaling/v2 HPA for a role: (dict "root" $ "role" "attention" "kind" "StatefulSet") */}}
{{- define "megascale.hpa" -}}
{{- $a := (index .root.Values .role).autoscaling }}
{{- if $a.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "megascale.roleName" . }}
  labels:
    {{- include "megascale.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ include "megascale.roleName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- range $a.podsMetrics }}
    - type: Pods
      pods:
        metric:
          name: {{ required "each autoscaling.podsMetrics entry needs a name" .name | quote }}
        target:
          type: AverageValue
          averageValue: {{ required (printf "autoscaling.podsMetrics %s needs an averageValue" .name) .averageValue | quote }}
    {{- end }}
    {{- if and (not $a.targetCPUUtilizationPercentage) (not $a.podsMetrics) }}
    {{- fail (printf "%s.autoscaling is enabled but has no metric: set targetCPUUtilizationPercentage or podsMetrics" .role) }}
    {{- end }}
{{- end }}
{{- end }}

{{/* The role's credentials as env, mounts and volumes: (dict "root" $ "role" "expert") */}}
{{- define "megascale.securityEnv" -}}
{{- $s := .root.Values.security }}
{{- if and (eq .role "gateway") $s.gatewayCredentialSecret }}
- name: MEGASCALE_CLUSTER_TOKEN_FILE
  value: /etc/megascale/token/credential
{{- else if $s.clusterTokenSecret }}
- name: MEGASCALE_CLUSTER_TOKEN_FILE
  value: /etc/megascale/token/token
{{- end }}
{{- if index $s.tlsSecrets .role }}
- name: MEGASCALE_TLS_CERT_FILE
  value: /etc/megascale/tls/tls.crt
- name: MEGASCALE_TLS_KEY_FILE
  value: /etc/megascale/tls/tls.key
- name: MEGASCALE_TLS_CA_FILE
  value: /etc/megascale/tls/ca.crt
{{- end }}
{{- end }}

{{- define "megascale.securityMounts" -}}
{{- $s := .root.Values.security }}
{{- if or $s.clusterTokenSecret (and (eq .role "gateway") $s.gatewayCredentialSecret) }}
- name: cluster-token
  mountPath: /etc/megascale/token
  readOnly: true
{{- end }}
{{- if index $s.tlsSecrets .role }}
- name: tls
  mountPath: /etc/megascale/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "megascale.securityVolumes" -}}
{{- $s := .root.Values.security }}
{{- $secret := $s.clusterTokenSecret }}
{{- if and (eq .role "gateway") $s.gatewayCredentialSecret }}
{{- $secret = $s.gatewayCredentialSecret }}
{{- end }}
{{- if $secret }}
- name: cluster-token
  secret:
    secretName: {{ $secret }}
    defaultMode: 0400
{{- end }}
{{- with index $s.tlsSecrets .role }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- end }}
