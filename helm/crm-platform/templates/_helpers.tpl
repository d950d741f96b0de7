{{/*
Names, labels and the list of processes of the release.
*/}}

{{- define "crm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name. Resource names append "-<service>-<role>" (at most
20 more characters), so it is cut at 42.
*/}}
{{- define "crm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "crm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "crm.labels" -}}
helm.sh/chart: {{ include "crm.chart" . }}
{{ include "crm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crm-platform
{{- end }}

{{/* Labels that select every pod of the release. */}}
{{- define "crm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one process's objects; call with (dict "root" $ "component" "contacts-api"). */}}
{{- define "crm.componentLabels" -}}
{{ include "crm.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels that select one process's pods. */}}
{{- define "crm.componentSelectorLabels" -}}
{{ include "crm.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "crm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The chart's own Secret (rendered only when some credential has no existing Secret). */}}
{{- define "crm.secretName" -}}
{{- printf "%s-credentials" (include "crm.fullname" .) }}
{{- end }}

{{- define "crm.postgresSecretName" -}}
{{- default (include "crm.secretName" .) .Values.postgresql.existingSecret }}
{{- end }}

{{- define "crm.mongoSecretName" -}}
{{- default (include "crm.secretName" .) .Values.mongodb.existingSecret }}
{{- end }}

{{/* The image of a service; call with (dict "root" $ "service" "contacts"). */}}
{{- define "crm.image" -}}
{{- $g := .root.Values.global.image }}
{{- $image := (index .root.Values .service).image }}
{{- $repo := $image.repository }}
{{- if $g.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" $g.registry) $repo }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repo $image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion $g.tag) }}
{{- end }}
{{- end }}

{{/*
The service registry: services.json beside Chart.yaml, generated from
crm_common.registry by `crm-stack registry --write` (never edited by hand).
Each service has name, grpcPort, httpPort, writeService and processes.
*/}}
{{- define "crm.registry" -}}
{{- .Files.Get "services.json" -}}
{{- end }}

{{/* The write services (event store in PostgreSQL, API + relay). */}}
{{- define "crm.writeServices" -}}
{{- $names := list }}
{{- range $s := (include "crm.registry" . | fromJson).services }}
{{- if $s.writeService }}{{ $names = append $names $s.name }}{{ end }}
{{- end }}
{{- join " " $names }}
{{- end }}

{{/* Every service the chart knows, enabled or not. */}}
{{- define "crm.allServices" -}}
{{- $names := list }}
{{- range $s := (include "crm.registry" . | fromJson).services }}
{{- $names = append $names $s.name }}
{{- end }}
{{- join " " $names }}
{{- end }}

{{/*
The processes of the enabled services, as YAML {processes: [...]}; each has
service, role, name (the component), command (the console script's
subcommand), api (serves gRPC + REST), singleWriter (at most one replica:
the relays and the projector), writeService (has an event store).
*/}}
{{- define "crm.processes" -}}
processes:
{{- range $s := (include "crm.registry" . | fromJson).services }}
{{- if (index $.Values $s.name).enabled }}
{{- range $p := $s.processes }}
  - {service: {{ $s.name }}, role: {{ $p.role }}, name: {{ $p.name }}, command: {{ $p.command }}, api: {{ $p.api }}, singleWriter: {{ $p.singleWriter }}, writeService: {{ $s.writeService }}}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod-level security context of every pod. */}}
{{- define "crm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context of every container. */}}
{{- define "crm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
"true" when a process holds the master keys (else empty); call with
(dict "name" "contacts-api" "writeService" true). Every process of a write
service seals and opens its own subjects' personal data; the analytics
projector (and its rebuild Job, "analytics-rebuild") opens every write
service's, reading their data keys from their key stores.
*/}}
{{- define "crm.holdsMasterKeys" -}}
{{- if or .writeService (has .name (list "analytics-projector" "analytics-rebuild")) }}true{{ end }}
{{- end }}

{{/* Where a pod that holds the master keys finds them (CRM_MASTER_KEYS_FILE). */}}
{{- define "crm.masterKeysFile" -}}
/etc/crm/master-keys/master-keys
{{- end }}

{{/*
The consumers of personal data keys look for an owner's key store in the
PostgreSQL schema named after the owner (crm_common.privacy.keystore): a
write service whose event store is in a schema of another name could not be
read by the 360 projector, so the chart refuses it.
*/}}
{{- define "crm.checkKeyStoreSchemas" -}}
{{- if .Values.analytics.enabled }}
{{- range $name := splitList " " (include "crm.writeServices" .) }}
{{- $svc := index $.Values $name }}
{{- if and $svc.enabled (ne $svc.postgresSchema $name) }}
{{- fail (printf "%s.postgresSchema must be %q while analytics is enabled: the 360 projector reads the personal data keys of %s in the schema named after it (it is %q)" $name $name $name $svc.postgresSchema) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of a process beyond the shared ConfigMap; call with
(dict "root" $ "service" "contacts" "writeService" true "masterKeys" true).
Write services get their event store's schema and password, read-model
services the MongoDB URL; a process holding the master keys gets their file
(and, in a read-model service, the PostgreSQL password: the owners' key
stores are in their schemas).
*/}}
{{- define "crm.processEnv" -}}
{{- if .writeService }}
- name: CRM_POSTGRES_SCHEMA
  value: {{ (index .root.Values .service).postgresSchema | quote }}
{{- end }}
{{- if or .writeService .masterKeys }}
- name: CRM_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "crm.postgresSecretName" .root }}
      key: {{ .root.Values.postgresql.passwordKey }}
{{- end }}
{{- if not .writeService }}
- name: CRM_MONGO_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "crm.mongoSecretName" .root }}
      key: {{ .root.Values.mongodb.urlKey }}
{{- end }}
{{- if .masterKeys }}
# The master keys, as a file the process re-reads when the Secret changes.
- name: CRM_MASTER_KEYS_FILE
  value: {{ include "crm.masterKeysFile" . | quote }}
{{- end }}
- name: CRM_SERVICE_KEY_FILE
  value: /etc/crm/service-key/key.pem
- name: CRM_SERVICE_KEY_ID
  value: {{ printf "service-%s" .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name={{ .root.Release.Namespace }},service.instance.id=$(CRM_POD_NAME)"
{{- with .root.Values.global.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of every pod: the root file system is read-only. */}}
{{/*
Volumes of a process; call with (dict "root" $ "service" "contacts" "masterKeys" true).
The key set, the service's own signing key, the pseudonym key, the master keys
(processes that hold them) and, with grpcTls, the certificates: each
read-only, each from its ConfigMap or Secret.
*/}}
{{- define "crm.volumes" -}}
{{- $auth := .root.Values.auth }}
{{- $tls := .root.Values.grpcTls }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: data
  emptyDir:
    sizeLimit: 256Mi
{{- if not $auth.jwksUrl }}
- name: jwks
  configMap:
    name: {{ $auth.jwksConfigMap }}
    items: [{key: jwks.json, path: jwks.json}]
{{- end }}
- name: service-key
  secret:
    secretName: {{ $auth.serviceKeysSecret }}
    items: [{key: {{ printf "%s.key.pem" .service }}, path: key.pem}]
- name: pseudonym
  secret:
    secretName: {{ $auth.pseudonymKeySecret }}
    items: [{key: pseudonym.key, path: pseudonym.key}]
{{- if .masterKeys }}
# Mounted as a directory (no subPath), so that the kubelet's updates of the
# Secret reach the running process; readable by the pod's group only.
- name: master-keys
  secret:
    secretName: {{ .root.Values.privacy.masterKeys.existingSecret }}
    defaultMode: 0440
    items: [{key: {{ .root.Values.privacy.masterKeys.key | quote }}, path: master-keys}]
{{- end }}
{{- if $tls.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ $tls.secret }}
- name: grpc-ca
  secret:
    secretName: {{ $tls.caSecret }}
{{- if ne $tls.clientAuth "none" }}
- name: grpc-client-ca
  secret:
    secretName: {{ $tls.clientCASecret }}
- name: grpc-client
  secret:
    secretName: {{ $tls.clientCertSecret }}
{{- end }}
{{- end }}
{{- end }}

{{- define "crm.volumeMounts" -}}
{{- $tls := .root.Values.grpcTls }}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/crm
{{- if not .root.Values.auth.jwksUrl }}
- name: jwks
  mountPath: /etc/crm/jwks
  readOnly: true
{{- end }}
- name: service-key
  mountPath: /etc/crm/service-key
  readOnly: true
- name: pseudonym
  mountPath: /etc/crm/pseudonym
  readOnly: true
{{- if .masterKeys }}
- name: master-keys
  mountPath: {{ include "crm.masterKeysFile" . | dir }}
  readOnly: true
{{- end }}
{{- if $tls.enabled }}
- name: grpc-tls
  mountPath: /etc/crm/grpc-tls
  readOnly: true
- name: grpc-ca
  mountPath: /etc/crm/grpc-ca
  readOnly: true
{{- if ne $tls.clientAuth "none" }}
- name: grpc-client-ca
  mountPath: /etc/crm/grpc-client-ca
  readOnly: true
- name: grpc-client
  mountPath: /etc/crm/grpc-client
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Annotations that roll the pods when their configuration changes. */}}
{{- define "crm.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
