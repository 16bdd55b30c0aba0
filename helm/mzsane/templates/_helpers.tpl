{{/*
Helpers of the mzsane sweep chart.

Why so much here: every object of a sweep point (RayJob, ConfigMap) must agree on names, labels and the
point's resolved config, so all of it is computed once by "mzsane.points" and read by the templates.
*/}}

{{/* Chart name (nameOverride replaces it) and the chart label value. */}}
{{- define "mzsane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: fullnameOverride, else the release name when it already contains the
sweep name (helm install zoo-size -f jobs/zoo-size.yaml), else "{release}-{sweep}". Two releases of one
sweep name therefore never share an object name. At most 30 characters (hashed beyond) so that point
names still fit KubeRay's 47-character RayJob limit.
*/}}
{{- define "mzsane.fullname" -}}
{{- $full := .Values.fullnameOverride -}}
{{- if not $full -}}
{{- if contains .Values.sweep.name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name .Values.sweep.name -}}
{{- end -}}
{{- end -}}
{{- include "mzsane.hashName" (dict "name" (include "mzsane.slug" $full) "max" 30) -}}
{{- end -}}

{{- define "mzsane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
A name of at most .max characters: unchanged when short enough, otherwise cut and suffixed with 8 hex
characters of its sha256 so that two long names that share a prefix never collide.
Usage: include "mzsane.hashName" (dict "name" $s "max" 47)
*/}}
{{- define "mzsane.hashName" -}}
{{- $name := .name -}}
{{- if le (len $name) (int .max) -}}
{{- $name -}}
{{- else -}}
{{- printf "%s-%s" ($name | trunc (int (sub .max 9)) | trimSuffix "-") (sha256sum $name | trunc 8) -}}
{{- end -}}
{{- end -}}

{{/* Lower-case DNS-1123 slug of any string: runs of other characters become one "-". */}}
{{- define "mzsane.slug" -}}
{{- regexReplaceAll "[^a-z0-9]+" (. | toString | lower) "-" | trimAll "-" -}}
{{- end -}}

{{/* Labels every object of the release carries. */}}
{{- define "mzsane.commonLabels" -}}
helm.sh/chart: {{ include "mzsane.chart" . }}
app.kubernetes.io/name: {{ include "mzsane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: mzsane
mzsane.io/sweep: {{ .Values.sweep.name | quote }}
{{- end -}}

{{/* Labels of one point's objects. Usage: include "mzsane.pointLabels" (dict "root" $ "point" $p) */}}
{{- define "mzsane.pointLabels" -}}
{{ include "mzsane.commonLabels" .root }}
mzsane.io/point: {{ .point.name | quote }}
{{- end -}}

{{/* Rank count and CPUs per rank of the worker group: one rank per GPU, or one per pod on CPU. */}}
{{- define "mzsane.ranksPerPod" -}}
{{- $gpu := int (default 0 .Values.worker.resources.gpu) -}}
{{- if gt $gpu 0 }}{{ $gpu }}{{ else }}1{{ end -}}
{{- end -}}

{{- define "mzsane.numWorkers" -}}
{{- mul (int .Values.worker.replicas) (int (include "mzsane.ranksPerPod" .)) -}}
{{- end -}}

{{/* Whole CPUs in a quantity (500m -> 0, 2 -> 2, 2.5 -> 2), at least 1. */}}
{{- define "mzsane.wholeCpus" -}}
{{- $q := toString . -}}
{{- $n := 0 -}}
{{- if hasSuffix "m" $q -}}
{{- $n = div (atoi (trimSuffix "m" $q)) 1000 -}}
{{- else -}}
{{- $n = int (floor (float64 $q)) -}}
{{- end -}}
{{- max $n 1 -}}
{{- end -}}

{{/* A CPU quantity as a float string (500m -> 0.5, "2" -> 2, 0.5 -> 0.5). */}}
{{- define "mzsane.cpuFloat" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- divf (float64 (trimSuffix "m" $q)) 1000.0 -}}
{{- else -}}
{{- float64 $q -}}
{{- end -}}
{{- end -}}

{{- define "mzsane.cpusPerWorker" -}}
{{- max (div (int (include "mzsane.wholeCpus" .Values.worker.resources.cpu)) (int (include "mzsane.ranksPerPod" .))) 1 -}}
{{- end -}}

{{/* A dotted config path and a value as a nested mapping: ("loss.norm_mode", "layer") -> {loss: {norm_mode: layer}} */}}
{{- define "mzsane.nested" -}}
{{- $value := .value -}}
{{- range (reverse (splitList "." .path)) -}}
{{- $value = dict . $value -}}
{{- end -}}
{{- toJson $value -}}
{{- end -}}

{{/*
Checks that the schema cannot express; each failure names the offending value and the fix.
*/}}
{{- define "mzsane.validate" -}}
{{- $v := .Values -}}
{{- if not $v.storage.s3.credentialsSecret.name -}}
{{- fail (printf "storage.s3.credentialsSecret.name is empty: S3 credentials for %q come only from a Secret; create one (deploy/README.md) and set its name" $v.storage.root) -}}
{{- end -}}
{{- $grid := default dict $v.sweep.grid -}}
{{- include "mzsane.refuseLists" . -}}
{{- $compositions := 0 -}}
{{- range $grid.compositions }}{{ if . }}{{ $compositions = add1 $compositions }}{{ end }}{{ end -}}
{{- if and (gt $compositions 0) (empty $grid.zooSizes) -}}
{{- fail "sweep.grid.compositions is set but sweep.grid.zooSizes is empty: give at least one zoo size, e.g. zooSizes: [100]" -}}
{{- end -}}
{{- if and (not (empty $grid.zooSizes)) (eq $compositions 0) -}}
{{- fail (printf "sweep.grid.zooSizes %v is set but sweep.grid.compositions is empty: give at least one composition, e.g. {NAME: {zoos: [%s]}}" $grid.zooSizes $v.sweep.targetZoo) -}}
{{- end -}}
{{- if has $v.sweep.targetZoo (default list $v.sweep.extraTargetZoos) -}}
{{- fail (printf "sweep.extraTargetZoos lists %q, which is already sweep.targetZoo; drop it from extraTargetZoos" $v.sweep.targetZoo) -}}
{{- end -}}
{{- $paths := list -}}
{{- range $axisPath := include "mzsane.axisPaths" . | fromJsonArray -}}
{{- $axisPaths := ternary (include "mzsane.seedPaths" $ | fromJsonArray) (list $axisPath) (eq $axisPath "seed") -}}
{{- range $path := $axisPaths -}}
{{- if has $path $paths -}}
{{- fail (printf "sweep.grid.axes: path %q appears twice (the seed axis sets %s); drop one of the two axes" $path (include "mzsane.seedPaths" . | fromJsonArray | join ", ")) -}}
{{- end -}}
{{- $paths = append $paths $path -}}
{{- end -}}
{{- end -}}
{{- if $v.metrics.enabled -}}
{{- $first := int $v.metrics.port -}}
{{- $last := add $first (int (include "mzsane.ranksPerPod" .)) | int -}}
{{- $last = sub $last 1 | int -}}
{{- range $rayPort := list 6379 8000 8080 8265 10001 44217 44227 52365 -}}
{{- if and (le $first $rayPort) (ge $last $rayPort) -}}
{{- fail (printf "metrics.port %d: local ranks serve on %d..%d, which includes Ray's port %d; use e.g. 9500" $first $first $last $rayPort) -}}
{{- end -}}
{{- end -}}
{{- if and (le $first 19999) (ge $last 10002) -}}
{{- fail (printf "metrics.port %d: local ranks serve on %d..%d, inside Ray's worker-port range 10002-19999; use e.g. 9500" $first $first $last) -}}
{{- end -}}
{{- if gt $last 32767 -}}
{{- fail (printf "metrics.port %d: the last local rank would serve on %d, inside the kernel's ephemeral range (32768+) that Ray's random ports use; use e.g. 9500" $first $last) -}}
{{- end -}}
{{- end -}}
{{- $wgpu := int (default 0 $v.worker.resources.gpu) -}}
{{- $hgpu := int (default 0 $v.head.resources.gpu) -}}
{{- if and (gt $wgpu 0) (eq $hgpu 0) -}}
{{- fail (printf "worker.resources.gpu is %d but head.resources.gpu is 0: sample and evaluate run in the job driver on the head and would run on CPU; set head.resources.gpu: 1" $wgpu) -}}
{{- end -}}
{{- range $group := list "head" "worker" -}}
{{- $res := (get $v $group).resources -}}
{{- $gpu := int (default 0 $res.gpu) -}}
{{- if and (gt $gpu 0) (lt (float64 (include "mzsane.cpuFloat" $res.cpu)) (float64 $gpu)) -}}
{{- fail (printf "%s.resources.cpu %v is below its GPU count %d: every GPU rank needs at least one CPU; set cpu to %d or more" $group $res.cpu $gpu $gpu) -}}
{{- end -}}
{{- end -}}
{{- if and $v.job.rayAuth (semverCompare "<2.52.0" $v.job.rayVersion) -}}
{{- fail (printf "job.rayAuth needs Ray 2.52.0 or later (KubeRay authOptions.mode token), job.rayVersion is %s; set job.rayAuth: false or use a newer image" $v.job.rayVersion) -}}
{{- end -}}
{{- if gt (len (toString $v.sweep.name)) 63 -}}
{{- fail (printf "sweep.name %q is longer than 63 characters; choose a shorter name" $v.sweep.name) -}}
{{- end -}}
{{- end -}}

{{/* The config paths a grid axis "path: seed" sets, all to the axis value (mzsane/sweep/schema.py SEED_PATHS). */}}
{{- define "mzsane.seedPaths" -}}
{{- list "data.seed" "train.seed" "sample.seed" "evaluate.seed" | toJson -}}
{{- end -}}

{{/* The grid's axis paths in the order they are crossed: by order (default 0), then path; deleted (null) axes left out. */}}
{{- define "mzsane.axisPaths" -}}
{{- $keys := list -}}
{{- range $path, $axis := (default dict .Values.sweep.grid).axes -}}
{{- if $axis }}{{ $keys = append $keys (printf "%09d %s" (int (default 0 $axis.order)) $path) }}{{ end -}}
{{- end -}}
{{- $paths := list -}}
{{- range sortAlpha $keys }}{{ $paths = append $paths (splitList " " . | last) }}{{ end -}}
{{- toJson $paths -}}
{{- end -}}

{{/*
runs, compositions and axes were lists before they were keyed by name; such a file is refused in one line
(the schema lets a list through so that this message, not a type error, is what Helm prints).
*/}}
{{- define "mzsane.refuseLists" -}}
{{- $grid := default dict .Values.sweep.grid -}}
{{- $examples := dict "sweep.runs" "runs: {NAME: {zooSize: 100, zoos: [mnist-cnn_s], set: {PATH: VALUE}}}" "sweep.grid.compositions" "compositions: {NAME: {zoos: [mnist-cnn_s]}}" "sweep.grid.axes" "axes: {PATH: {values: [A, B]}}" -}}
{{- range $key, $section := dict "sweep.runs" .Values.sweep.runs "sweep.grid.compositions" $grid.compositions "sweep.grid.axes" $grid.axes -}}
{{- if kindIs "slice" $section -}}
{{- fail (printf "%s is a list, the format before entries were keyed by name so that overlays merge; key it (%s): print a values file keyed with `mzsane sweep convert -f FILE` (after the -f files it is stacked on, if any)" $key (get $examples $key)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Every point of the sweep as a JSON list: the grid (zoo sizes x compositions x axes, in that order) then
the explicit runs. Compositions and runs are maps keyed by name, axes by config path, so that overlays merge
them (helm/mzsane/README.md, "Overlays"): a null entry is one an overlay deleted. Maps are walked in key
order: compositions and runs by name, axes by (order, path), which is also the order their values join in
a point's name. Each point: name (DNS-1123, <= 40 characters, also its results folder), job (the
RayJob/ConfigMap name, DNS-1035, <= 47 characters as KubeRay requires), zooSize, zoos, composition,
axes ({path: value}) and overrides (the nested config overrides the point runs with).
*/}}
{{- define "mzsane.points" -}}
{{- $v := .Values -}}
{{- $grid := default dict $v.sweep.grid -}}
{{- include "mzsane.validate" . -}}{{/* first: its messages are more precise than "no points" */}}
{{- $raw := list -}}
{{- range $size := $grid.zooSizes -}}
{{- range $cname, $comp := $grid.compositions -}}
{{- if $comp -}}
{{- $raw = append $raw (dict "base" (printf "n%d-%s" (int $size) (include "mzsane.slug" $cname)) "zooSize" (int $size) "zoos" $comp.zoos "composition" $cname "set" dict) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $path := include "mzsane.axisPaths" . | fromJsonArray -}}
{{- $axis := get $grid.axes $path -}}
{{- $next := list -}}
{{- range $p := $raw -}}
{{- range $value := $axis.values -}}
{{- $axisSet := dict $path $value -}}
{{- if eq $path "seed" -}}{{/* one axis for every seed of the point (mzsane/sweep/schema.py SEED_PATHS) */}}
{{- $axisSet = dict -}}
{{- range $seedPath := include "mzsane.seedPaths" $ | fromJsonArray }}{{ $_ := set $axisSet $seedPath $value }}{{ end -}}
{{- end -}}
{{- $set := merge $axisSet (deepCopy $p.set) -}}
{{- $next = append $next (merge (dict "base" (printf "%s-%s" $p.base (include "mzsane.slug" $value)) "set" $set) (deepCopy $p)) -}}
{{- end -}}
{{- end -}}
{{- $raw = $next -}}
{{- end -}}
{{- range $rname, $run := $v.sweep.runs -}}
{{- if $run -}}
{{- $raw = append $raw (dict "base" (include "mzsane.slug" $rname) "zooSize" (int $run.zooSize) "zoos" $run.zoos "composition" (default (join "+" $run.zoos) $run.composition) "set" (default dict $run.set)) -}}
{{- end -}}
{{- end -}}
{{- $numWorkers := int (include "mzsane.numWorkers" .) -}}
{{- $points := list -}}
{{- $seen := list -}}
{{- range $p := $raw -}}
{{- $name := include "mzsane.hashName" (dict "name" $p.base "max" 40) -}}
{{- if has $name $seen -}}
{{- fail (printf "sweep point %q is defined twice (grid and runs, or repeated values); rename the run or drop the duplicate" $p.base) -}}
{{- end -}}
{{- $seen = append $seen $name -}}
{{- $prefix := include "mzsane.fullname" $ -}}
{{- if not (regexMatch "^[a-z]" $prefix) }}{{ $prefix = printf "m%s" $prefix }}{{ end -}}{{/* DNS-1035 */}}
{{- $full := printf "%s-%s" $prefix $name -}}
{{- $job := $full -}}
{{- if gt (len $full) 47 -}}{{/* keep the point readable: cut the prefix first, hash the full name */}}
{{- $short := printf "%s-%s" ($prefix | trunc 14 | trimSuffix "-") $name -}}
{{- $job = printf "%s-%s" ($short | trunc 38 | trimSuffix "-") (sha256sum $full | trunc 8) -}}
{{- end -}}
{{- $runName := printf "%s-%s" $v.sweep.name $name -}}
{{- $data := dict "zoos" $p.zoos "num_models_per_zoo" $p.zooSize -}}
{{- if $v.storage.shardsUrl }}{{ $_ := set $data "shards_url" $v.storage.shardsUrl }}{{ end -}}
{{- $fixed := dict
    "run_name" $runName
    "storage" (dict "root" $v.storage.root)
    "data" $data
    "sample" (dict "target_zoo" $v.sweep.targetZoo)
    "cluster" (dict "address" "auto" "num_workers" $numWorkers "cpus_per_worker" (int (include "mzsane.cpusPerWorker" $)) "use_gpu" (gt (int (default 0 $v.worker.resources.gpu)) 0))
    "metrics" (dict "enabled" $v.metrics.enabled "port" (int $v.metrics.port) "host" "0.0.0.0") -}}
{{- $overrides := mergeOverwrite (deepCopy (default dict $v.sweep.config)) $fixed -}}
{{- range $path, $value := $p.set -}}
{{- $overrides = mergeOverwrite $overrides (include "mzsane.nested" (dict "path" $path "value" $value) | fromJson) -}}
{{- end -}}
{{- $points = append $points (dict "name" $name "job" $job "runName" $runName "zooSize" $p.zooSize "zoos" $p.zoos "composition" $p.composition "axes" $p.set "overrides" $overrides) -}}
{{- end -}}
{{- if empty $points -}}
{{- fail "the sweep has no points: set sweep.grid.zooSizes and sweep.grid.compositions, or sweep.runs" -}}
{{- end -}}
{{- toJson $points -}}
{{- end -}}

{{/* Writable HOME and caches under the /tmp emptyDir (the root filesystem is read-only). */}}
{{- define "mzsane.homeEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: MPLBACKEND
  value: Agg
{{- end -}}

{{/* S3 environment of Ray nodes: endpoint from values, credentials only from the Secret. */}}
{{- define "mzsane.s3Env" -}}
{{- $s3 := .Values.storage.s3 -}}
- name: MZSANE_S3_ENDPOINT
  value: {{ default "" $s3.endpoint | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ default "us-east-1" $s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.credentialsSecret.name }}
      key: {{ default "AWS_ACCESS_KEY_ID" $s3.credentialsSecret.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.credentialsSecret.name }}
      key: {{ default "AWS_SECRET_ACCESS_KEY" $s3.credentialsSecret.secretAccessKeyKey }}
{{- end -}}

{{/* Restricted-profile security contexts (Pod Security Standards "restricted"). */}}
{{- define "mzsane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int (default 1000 .Values.podSecurity.runAsUser) }}
runAsGroup: {{ int (default 100 .Values.podSecurity.runAsGroup) }}
fsGroup: {{ int (default 100 .Values.podSecurity.fsGroup) }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "mzsane.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Training-rank metrics ports of one worker pod: local rank r serves Prometheus on metrics.port + r and the
port is named mzsane-r{r}. The names "metrics" (8080), "dashboard", "client" and "gcs-server" stay
KubeRay's own: with no port named "metrics" KubeRay adds metrics: 8080 itself and the head Service then
carries 8080 twice, which the API server rejects. Output: a JSON list of {name, containerPort}.
*/}}
{{- define "mzsane.rankPorts" -}}
{{- $out := list -}}
{{- if .Values.metrics.enabled -}}
{{- range $r := until (int (include "mzsane.ranksPerPod" .)) -}}
{{- $out = append $out (dict "name" (printf "mzsane-r%d" $r) "containerPort" (add (int $.Values.metrics.port) $r)) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The one pod template used by the head group, the worker group and the job submitter.
Usage: include "mzsane.podTemplate" (dict "root" $ "point" $p "role" "head"|"worker"|"submitter" "group" $groupValues)
Writable paths under a read-only root filesystem: /tmp (Ray's /tmp/ray session dirs, HOME, caches) and
/dev/shm (Ray's object store) are emptyDirs; the point's overrides are mounted at /etc/mzsane.
Every escape hatch of values.pod (labels, annotations, env, volumes, priorityClassName, schedulerName) and
of the group (nodeSelector, tolerations, affinity) lands here, so the three pods cannot drift apart.
*/}}
{{- define "mzsane.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $pod := default dict $v.pod -}}
{{- $p := .point -}}
{{- $res := .group.resources -}}
{{- $gpu := int (default 0 $res.gpu) -}}
{{- $ray := ne .role "submitter" -}}
metadata:
  labels:
    {{- with $pod.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- /* app.kubernetes.io/name stays KubeRay's "kuberay": the head Service the RayJob controller makes
           (common/job.go BuildHeadServiceForRayJob) selects on it */}}
    {{- $labels := include "mzsane.pointLabels" (dict "root" $root "point" $p) | fromYaml }}
    {{- $_ := unset $labels "app.kubernetes.io/name" }}
    {{- toYaml $labels | nindent 4 }}
    app.kubernetes.io/component: {{ .role | quote }}
  {{- with $pod.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  enableServiceLinks: false
  {{- if eq .role "submitter" }}
  restartPolicy: Never
  {{- end }}
  {{- with $v.job.serviceAccountName }}
  serviceAccountName: {{ . | quote }}
  {{- end }}
  automountServiceAccountToken: false
  {{- with $pod.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with $pod.schedulerName }}
  schedulerName: {{ . | quote }}
  {{- end }}
  securityContext:
    {{- include "mzsane.podSecurityContext" $root | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ if eq .role "submitter" }}ray-job-submitter{{ else }}ray-{{ .role }}{{ end }}
      image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
      imagePullPolicy: {{ default "IfNotPresent" $v.image.pullPolicy }}
      env:
        {{- include "mzsane.homeEnv" $root | nindent 8 }}
        {{- if $ray }}
        {{- include "mzsane.s3Env" $root | nindent 8 }}
        {{- end }}
        {{- with $pod.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        requests:
          cpu: {{ $res.cpu | quote }}
          memory: {{ $res.memory | quote }}
          {{- with $res.ephemeralStorage }}
          ephemeral-storage: {{ . | quote }}
          {{- end }}
        limits:
          cpu: {{ $res.cpu | quote }}
          memory: {{ $res.memory | quote }}
          {{- if gt $gpu 0 }}
          nvidia.com/gpu: {{ $gpu | quote }}
          {{- end }}
      {{- if $ray }}
      ports:
        # KubeRay's own names and numbers (common/pod.go, common/service.go of v1.7.0)
        - {name: metrics, containerPort: 8080}
        {{- if eq .role "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
        {{- if eq .role "worker" }}
        {{- range include "mzsane.rankPorts" $root | fromJsonArray }}
        - {name: {{ .name }}, containerPort: {{ int .containerPort }}}
        {{- end }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- include "mzsane.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        {{- if $ray }}
        - {name: shm, mountPath: /dev/shm}
        - {name: point-config, mountPath: /etc/mzsane, readOnly: true}
        {{- with $pod.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    {{- if $ray }}
    - name: shm
      emptyDir: {medium: Memory, sizeLimit: {{ $res.memory | quote }}}
    - name: point-config
      configMap:
        name: {{ $p.job }}
    {{- with $pod.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- end }}
{{- end -}}

{{/*
The entrypoint the job driver runs on the head: one fixed command. Its stages (record the point, train ->
sample -> evaluate -> probe, then sample -> evaluate per extra target) and every location they use are
read from the mounted point file by mzsane/sweep/point.py, so no Helm value is ever on a command line, and
KubeRay's submitter (which pastes spec.entrypoint unquoted into `bash -ce "ray job submit ... -- ENTRYPOINT ;"`)
sends the whole point to Ray: the first failing stage fails the Ray job, and with it the RayJob.
Results land in {storage.root}/sweeps/{sweep}/{point}/ (evaluate/results.json, probe/probe.json).
*/}}
{{- define "mzsane.entrypoint" -}}
python -m mzsane.sweep run-point /etc/mzsane/point.json
{{- end -}}

{{/* The one target-label scheme of every scrape path (also in deploy/prometheus/). */}}
{{- define "mzsane.targetRelabelings" -}}
- {sourceLabels: [__meta_kubernetes_pod_label_mzsane_io_sweep], targetLabel: sweep}
- {sourceLabels: [__meta_kubernetes_pod_label_mzsane_io_point], targetLabel: point}
- {sourceLabels: [__meta_kubernetes_pod_label_ray_io_cluster], targetLabel: ray_io_cluster}
- {sourceLabels: [__meta_kubernetes_pod_label_ray_io_node_type], targetLabel: ray_node_type}
{{- end -}}
