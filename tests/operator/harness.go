package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"k8s.io/apimachinery/pkg/api/meta"

	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/zapr"
	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	raycontrollers "github.com/ray-project/kuberay/ray-operator/controllers/ray"
	"github.com/ray-project/kuberay/ray-operator/controllers/ray/utils"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/yaml"
)

// loaded: the kinds the harness takes from the rendered file; the rest (NetworkPolicy, the Helm test
// hook Pod) no controller of KubeRay reads, and a Pod in the input would be mistaken for an operator's.
var loaded = map[string]bool{"ConfigMap": true, "Secret": true, "RayJob": true}

// mgrShim is the part of a controller-runtime Manager that KubeRay's constructors read (client, scheme,
// event recorder); the fake client stands in for the API server and its informer cache.
type mgrShim struct {
	manager.Manager
	c client.Client
	s *runtime.Scheme
}

func (m mgrShim) GetClient() client.Client    { return m.c }
func (m mgrShim) GetAPIReader() client.Reader { return m.c }
func (m mgrShim) GetScheme() *runtime.Scheme  { return m.s }

// GetEventRecorderFor is what ray-operator v1.6.2's reconcilers ask for; a nil Events channel drops events.
func (m mgrShim) GetEventRecorderFor(name string) record.EventRecorder { return &record.FakeRecorder{} }

// GetFieldIndexer: v1.6.2's RayCluster reconciler registers a Pod index on metadata.uid when it is made;
// the fake client gets the same index when it is built (podUIDIndex), so registering here is a no-op.
func (m mgrShim) GetFieldIndexer() client.FieldIndexer { return noIndexer{} }

type noIndexer struct{}

func (noIndexer) IndexField(context.Context, client.Object, string, client.IndexerFunc) error {
	return nil
}

func podUIDIndex(o client.Object) []string { return []string{string(o.GetUID())} }

// kubelet plays the node's part between reconcile passes: it gives Pods and Jobs the status a real
// kubelet and Job controller would.
type kubelet interface {
	sync(ctx context.Context, c client.Client) error
}

type statusStep struct {
	JobDeploymentStatus string `json:"jobDeploymentStatus"`
	JobStatus           string `json:"jobStatus"`
	Reason              string `json:"reason,omitempty"`
	Message             string `json:"message,omitempty"`
}

type harness struct {
	scheme   *runtime.Scheme
	client   client.Client
	jobs     *raycontrollers.RayJobReconciler
	clusters *raycontrollers.RayClusterReconciler
	kubelet  kubelet
	admit    bool
	input    map[string]bool // kind/namespace/name of what the input held
	seq      map[string][]statusStep
	order    []string
}

func newScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, err
	}
	return s, rayv1.AddToScheme(s)
}

func key(kind string, o client.Object) string {
	return kind + "/" + o.GetNamespace() + "/" + o.GetName()
}

// readObjects decodes every document strictly: a field the Go types do not know is an error, as it
// would be for the API server's structural schema (pruning aside).
func readObjects(path string, s *runtime.Scheme) ([]client.Object, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
	var objs []client.Object
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if len(u.Object) == 0 || !loaded[u.GetKind()] {
			continue
		}
		typed, err := s.New(u.GroupVersionKind())
		if err != nil {
			return nil, fmt.Errorf("%s: %s %s: %w", path, u.GetKind(), u.GetName(), err)
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, typed, true); err != nil {
			return nil, fmt.Errorf("%s: %s %s does not fit the %s types: %w", path, u.GetKind(), u.GetName(), u.GetAPIVersion(), err)
		}
		objs = append(objs, typed.(client.Object))
	}
	return objs, nil
}

func newHarness(ctx context.Context, in, crds string, provider utils.ClientProvider) (*harness, error) {
	s, err := newScheme()
	if err != nil {
		return nil, err
	}
	schemas, err := loadCRDs(crds)
	if err != nil {
		return nil, err
	}
	objs, err := readObjects(in, s)
	if err != nil {
		return nil, err
	}
	c := fake.NewClientBuilder().WithScheme(s).
		WithStatusSubresource(&rayv1.RayJob{}, &rayv1.RayCluster{}, &corev1.Pod{}, &batchv1.Job{}).
		WithIndex(&corev1.Pod{}, "metadata.uid", podUIDIndex).
		WithInterceptorFuncs(schemas.interceptors()).Build()
	h := &harness{scheme: s, client: c, input: map[string]bool{}, seq: map[string][]statusStep{}}
	for _, o := range objs {
		gvk, _ := apiutil.GVKForObject(o, s)
		if o.GetNamespace() == "" {
			o.SetNamespace("default")
		}
		if err := c.Create(ctx, o); err != nil {
			return nil, fmt.Errorf("create %s %s: %w", gvk.Kind, o.GetName(), err)
		}
		h.input[key(gvk.Kind, o)] = true
		if gvk.Kind == "RayJob" {
			h.order = append(h.order, o.GetNamespace()+"/"+o.GetName())
		}
	}
	if len(h.order) == 0 {
		return nil, fmt.Errorf("%s holds no RayJob", in)
	}
	mgr := mgrShim{c: c, s: s}
	h.jobs = raycontrollers.NewRayJobReconciler(ctx, mgr, raycontrollers.RayJobReconcilerOptions{}, provider)
	h.clusters = raycontrollers.NewReconciler(ctx, mgr, raycontrollers.RayClusterReconcilerOptions{})
	return h, nil
}

// loop reconciles until every RayJob reached the mode's goal: its submitter Job exists (reconcile) or it
// is Complete/Failed (run). Requeue delays are ignored: each pass reconciles everything once.
func (h *harness) loop(ctx context.Context, mode string) error {
	for _, nn := range h.order { // the status each RayJob was created with (New)
		ns, name, _ := strings.Cut(nn, "/")
		if err := h.record(ctx, types.NamespacedName{Namespace: ns, Name: name}); err != nil {
			return err
		}
	}
	settle := 0
	for pass := 1; ; pass++ {
		if err := h.pass(ctx); err != nil {
			return err
		}
		done, err := h.done(ctx, mode)
		if err != nil {
			return err
		}
		if done {
			// two more passes: what the operator makes once a RayJob is Running (its own head Service)
			if settle++; mode == "run" || settle > 2 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up after %d passes: %s", pass, h.summary())
		case <-time.After(passDelay(mode)):
		}
	}
}

func passDelay(mode string) time.Duration {
	if mode == "run" {
		return time.Second
	}
	return 10 * time.Millisecond
}

func (h *harness) pass(ctx context.Context) error {
	for _, nn := range h.order {
		ns, name, _ := strings.Cut(nn, "/")
		req := ctrl.Request{NamespacedName: types.NamespacedName{Namespace: ns, Name: name}}
		if _, err := h.jobs.Reconcile(ctx, req); err != nil {
			progress("rayjob %s: requeue: %v", name, err)
		}
		if err := h.record(ctx, req.NamespacedName); err != nil {
			return err
		}
	}
	var clusters rayv1.RayClusterList
	if err := h.client.List(ctx, &clusters); err != nil {
		return err
	}
	for _, rc := range clusters.Items {
		req := ctrl.Request{NamespacedName: types.NamespacedName{Namespace: rc.Namespace, Name: rc.Name}}
		if _, err := h.clusters.Reconcile(ctx, req); err != nil {
			progress("raycluster %s: requeue: %v", rc.Name, err)
		}
	}
	return h.kubelet.sync(ctx, h.client)
}

// record appends the RayJob's status to its sequence when it changed, and plays Kueue when asked.
func (h *harness) record(ctx context.Context, nn types.NamespacedName) error {
	var job rayv1.RayJob
	if err := h.client.Get(ctx, nn, &job); err != nil {
		return fmt.Errorf("rayjob %s: %w", nn.Name, err)
	}
	step := statusStep{string(job.Status.JobDeploymentStatus), string(job.Status.JobStatus),
		string(job.Status.Reason), job.Status.Message}
	seq := h.seq[nn.String()]
	if len(seq) == 0 || seq[len(seq)-1] != step {
		h.seq[nn.String()] = append(seq, step)
		progress("rayjob %s: jobDeploymentStatus=%q jobStatus=%q %s", nn.Name, step.JobDeploymentStatus, step.JobStatus, step.Message)
	}
	if h.admit && job.Spec.Suspend && job.Status.JobDeploymentStatus == rayv1.JobDeploymentStatusSuspended {
		job.Spec.Suspend = false
		progress("rayjob %s: admitted (spec.suspend=false, as Kueue does)", nn.Name)
		return h.client.Update(ctx, &job)
	}
	return nil
}

func (h *harness) done(ctx context.Context, mode string) (bool, error) {
	for _, nn := range h.order {
		ns, name, _ := strings.Cut(nn, "/")
		var job rayv1.RayJob
		if err := h.client.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &job); err != nil {
			return false, err
		}
		switch mode {
		case "reconcile":
			var submitter batchv1.Job
			if err := h.client.Get(ctx, types.NamespacedName{Namespace: ns, Name: name}, &submitter); err != nil {
				return false, client.IgnoreNotFound(err)
			}
			if job.Status.JobDeploymentStatus != rayv1.JobDeploymentStatusRunning {
				return false, nil
			}
		case "run":
			if s := job.Status.JobDeploymentStatus; s != rayv1.JobDeploymentStatusComplete && s != rayv1.JobDeploymentStatusFailed {
				return false, nil
			}
		}
	}
	return true, nil
}

func (h *harness) summary() string {
	var parts []string
	for _, nn := range h.order {
		seq := h.seq[nn]
		if len(seq) > 0 {
			last := seq[len(seq)-1]
			parts = append(parts, fmt.Sprintf("%s %s/%s", nn, last.JobDeploymentStatus, last.JobStatus))
		}
	}
	return strings.Join(parts, ", ")
}

// write puts every object the operator made (not in the input) into objects.yaml, each with its kind,
// and the RayJobs' status sequences into status.json.
func (h *harness) write(out string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	ctx := context.Background()
	lists := []client.ObjectList{&rayv1.RayJobList{}, &rayv1.RayClusterList{}, &corev1.PodList{},
		&corev1.ServiceList{}, &batchv1.JobList{}, &corev1.SecretList{}, &corev1.ConfigMapList{}}
	var docs []string
	for _, list := range lists {
		if err := h.client.List(ctx, list); err != nil {
			return err
		}
		items, err := metaItems(list)
		if err != nil {
			return err
		}
		for _, o := range items {
			gvk, err := apiutil.GVKForObject(o, h.scheme)
			if err != nil {
				return err
			}
			if h.input[key(gvk.Kind, o)] && gvk.Kind != "RayJob" { // RayJobs: written with their status
				continue
			}
			o.GetObjectKind().SetGroupVersionKind(gvk)
			doc, err := yaml.Marshal(o)
			if err != nil {
				return err
			}
			docs = append(docs, string(doc))
		}
	}
	sort.Strings(docs) // kinds and names in a stable order for diffs
	if err := os.WriteFile(filepath.Join(out, "objects.yaml"), []byte(strings.Join(docs, "---\n")), 0o644); err != nil {
		return err
	}
	status, err := json.MarshalIndent(h.seq, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(out, "status.json"), status, 0o644)
}

// metaItems: the objects of any typed list, through apimachinery's own list accessor.
func metaItems(list client.ObjectList) ([]client.Object, error) {
	items, err := meta.ExtractList(list)
	if err != nil {
		return nil, err
	}
	objs := make([]client.Object, 0, len(items))
	for _, item := range items {
		obj, ok := item.(client.Object)
		if !ok {
			return nil, fmt.Errorf("unexpected item %T in %T", item, list)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().UTC().Format("15:04:05")+" "+format+"\n", args...)
}

// setupLogging sends the operator's logr output to stderr with -v, and nowhere otherwise.
func setupLogging(verbose bool) {
	if !verbose {
		ctrl.SetLogger(logr.Discard())
		return
	}
	cfg := zap.NewDevelopmentConfig()
	cfg.Level = zap.NewAtomicLevelAt(zapcore.InfoLevel)
	z, err := cfg.Build()
	if err != nil {
		ctrl.SetLogger(logr.Discard())
		return
	}
	ctrl.SetLogger(zapr.NewLogger(z))
}
