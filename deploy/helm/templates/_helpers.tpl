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
{{- $variant := default "auto" $img.variant -}}
{{- if eq $variant "auto" -}}
{{- $device := toString (default "cpu" (index $v .role).device) -}}
{{- $variant = ternary "cpu" "cuda" (eq $device "cpu") -}}
{{- end -}}
{{- printf "%s:%s" $img.repository (default (printf "%s-%s" .root.Chart.AppVersion $variant) ($img.tag | toString)) }}
{{- end }}

{{- define "megascale.pullPolicy" -}}
{{- $v := .root.Values -}}
{{- default $v.image.pullPolicy (default (dict) (index $v .role).image).pullPolicy }}
{{- end }}

{{/* host:port of the scheduler's gRPC Service, which every role dials. */}}
{{- define "megascale.schedulerAddress" -}}
{{- printf "%s.%s.svc.%s:%v" (include "megascale.roleName" (dict "root" . "role" "scheduler")) .Release.Namespace .Values.clusterDomain .Values.scheduler.grpcPort }}
{{- end }}

{{/* The Secret (name, key) holding the chart Redis's password. */}}
{{- define "megascale.redisAuthSecret" -}}
{{- default (include "megascale.roleName" (dict "root" . "role" "redis-auth")) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* The scheduler's Redis env: the chart Redis's URL with the password from its Secret, or
the whole external URL from a Secret. Nothing secret is ever a plain value. */}}
{{- define "megascale.redisEnv" -}}
{{- $r := .Values.redis }}
{{- if $r.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "megascale.redisAuthSecret" . }}
      key: {{ $r.auth.existingSecretKey }}
- name: MEGASCALE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc.%s:%v/0" (include "megascale.roleName" (dict "root" . "role" "redis")) .Release.Namespace .Values.clusterDomain $r.port | quote }}
{{- else }}
- name: MEGASCALE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.external.urlSecret is required when redis.enabled is false (a Secret holding the redis:// URL)" $r.external.urlSecret }}
      key: {{ $r.external.urlSecretKey }}
{{- end }}
{{- end }}

{{- define "megascale.clusterTokenSecret" -}}
{{- default (include "megascale.roleName" (dict "root" . "role" "cluster-token")) .Values.security.clusterToken.existingSecret }}
{{- end }}

{{- define "megascale.tlsSecret" -}}
{{- $t := .root.Values.security.tls }}
{{- default (required "security.tls.secretName (or security.tls.perRole.ROLE) is required when security.tls.enabled is true" (default (index $t.perRole .role) $t.secretName)) (index $t.perRole .role) }}
{{- end }}

{{/* Env of the token and TLS files (mounted by megascale.securityMounts). (dict "root" $ "role" R) */}}
{{- define "megascale.securityEnv" -}}
{{- $sec := .root.Values.security }}
{{- if $sec.clusterToken.enabled }}
- name: MEGASCALE_CLUSTER_TOKEN_FILE
  value: /var/run/secrets/megascale/cluster-token/token
{{- end }}
{{- if $sec.tls.enabled }}
- name: MEGASCALE_TLS_CERT_FILE
  value: /var/run/secrets/megascale/tls/tls.crt
- name: MEGASCALE_TLS_KEY_FILE
  value: /var/run/secrets/megascale/tls/tls.key
- name: MEGASCALE_TLS_CA_FILE
  value: /var/run/secrets/megascale/tls/ca.crt
{{- end }}
{{- end }}

{{- define "megascale.securityMounts" -}}
{{- $sec := .root.Values.security }}
- name: tmp
  mountPath: /tmp
{{- if $sec.clusterToken.enabled }}
- name: cluster-token
  mountPath: /var/run/secrets/megascale/cluster-token
  readOnly: true
{{- end }}
{{- if $sec.tls.enabled }}
- name: tls
  mountPath: /var/run/secrets/megascale/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "megascale.securityVolumes" -}}
{{- $sec := .root.Values.security }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.common.tmpSize }}
{{- if $sec.clusterToken.enabled }}
- name: cluster-token
  secret:
    secretName: {{ include "megascale.clusterTokenSecret" .root }}
    defaultMode: 0440
    items:
      - key: {{ $sec.clusterToken.existingSecretKey }}
        path: token
{{- end }}
{{- if $sec.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "megascale.tlsSecret" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}

{{/* The pod securityContext (the same for every megascale pod); no role calls the
Kubernetes API, so no pod gets a service account token. */}}
{{- define "megascale.podSecurityContext" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.security.podSecurityContext | nindent 2 }}
{{- end }}

{{/* A container securityContext; attention and expert add IPC_LOCK for rdma. */}}
{{- define "megascale.containerSecurityContext" -}}
{{- $c := deepCopy .root.Values.security.containerSecurityContext }}
{{- if and .root.Values.security.rdma.enabled (has .role (list "attention" "expert")) }}
{{- $caps := default (dict) $c.capabilities }}
{{- $_ := set $caps "add" (list "IPC_LOCK") }}
{{- $_ := set $c "capabilities" $caps }}
{{- end }}
securityContext:
  {{- toYaml $c | nindent 2 }}
{{- end }}

{{/* resources with ROLE.gpus merged in as nvidia.com/gpu (requests = limits for an extended
resource). */}}
{{- define "megascale.resources" -}}
{{- $r := index .root.Values .role }}
{{- $res := deepCopy (default (dict) $r.resources) }}
{{- if gt (int (default 0 $r.gpus)) 0 }}
{{- $limits := default (dict) $res.limits }}
{{- $_ := set $limits "nvidia.com/gpu" (int $r.gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- with $res }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* preStop sleep: the pod keeps serving what it has while it leaves the endpoints. */}}
{{- define "megascale.lifecycle" -}}
{{- $r := index .root.Values .role }}
{{- if gt (int $r.preStopSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ $r.preStopSeconds | quote }}]
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
{{- if lt (int $v.attention.microBatches) 1 }}
{{- fail (printf "attention.microBatches must be >= 1, got %v" $v.attention.microBatches) }}
{{- end }}
{{- if $v.expert.elastic }}
{{- if lt (int $v.expert.replicas) (int $v.scheduler.expertReplicas) }}
{{- fail (printf "expert.replicas (%v) must be >= scheduler.expertReplicas (%v): copies of an expert live on distinct nodes" $v.expert.replicas $v.scheduler.expertReplicas) }}
{{- end }}
{{- range $k := list "autoscaling" "keda" }}
{{- $a := index $v.expert $k }}
{{- if and $a.enabled (lt (int $a.minReplicas) (int $v.scheduler.expertReplicas)) }}
{{- fail (printf "expert.%s.minReplicas (%v) must be >= scheduler.expertReplicas (%v)" $k $a.minReplicas $v.scheduler.expertReplicas) }}
{{- end }}
{{- end }}
{{- else if $v.expert.keda.enabled }}
{{- fail "expert.keda needs expert.elastic: fixed shards cannot change N at run time" }}
{{- end }}
{{- range $role := list "expert" "attention" "gateway" }}
{{- $r := index $v $role }}
{{- if and $r.autoscaling.enabled $r.keda.enabled }}
{{- fail (printf "%s.autoscaling and %s.keda are exclusive (KEDA makes its own HPA)" $role $role) }}
{{- end }}
{{- if and $r.keda.enabled (gt (int $r.keda.minReplicas) (int $r.keda.maxReplicas)) }}
{{- fail (printf "%s.keda.minReplicas (%v) must be <= maxReplicas (%v)" $role $r.keda.minReplicas $r.keda.maxReplicas) }}
{{- end }}
{{- end }}
{{- range $role := list "scheduler" "expert" "attention" "gateway" }}
{{- $r := index $v $role }}
{{- if le (int $r.terminationGracePeriodSeconds) (int $r.preStopSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.preStopSeconds (%v): the process needs time to stop after the sleep" $role $r.terminationGracePeriodSeconds $role $r.preStopSeconds) }}
{{- end }}
{{- end }}
{{- range $role := list "expert" "attention" }}
{{- $r := index $v $role }}
{{- if and (hasPrefix "cuda" (toString $r.device)) (eq (int $r.gpus) 0) (not (hasKey (default (dict) (default (dict) $r.resources).limits) "nvidia.com/gpu")) }}
{{- fail (printf "%s.device is %s but its pods request no GPU: set %s.gpus (nvidia.com/gpu)" $role $r.device $role) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Downward-API env every role gets first, so later values can use $(POD_NAME) etc.
(dict "role" "gateway") */}}
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
# Internal roles listen on the pod IP only; the gateway, which faces clients, on every address
# (kubectl port-forward dials the pod's loopback).
- name: MEGASCALE_HOST
  value: {{ if eq (default "" .role) "gateway" }}"0.0.0.0"{{ else }}"$(POD_IP)"{{ end }}
# The root filesystem is read-only: caches (torch, Triton, FlashInfer) go to the /tmp emptyDir.
- name: HOME
  value: /tmp
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
    {{- include "megascale.containerSecurityContext" (dict "root" .root "role" "demo-model") | nindent 4 }}
    volumeMounts:
      - name: model
        mountPath: /model
      - name: tmp
        mountPath: /tmp
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

{{/* nodeSelector / tolerations / affinity / pull secrets / grace of a role's pod spec. */}}
{{- define "megascale.scheduling" -}}
{{- $v := .root.Values }}
{{- $r := index $v .role }}
{{- with $r.terminationGracePeriodSeconds }}
terminationGracePeriodSeconds: {{ . }}
{{- end }}
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
