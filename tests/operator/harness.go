package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
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
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	toolscache "k8s.io/client-go/tools/cache"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/yaml"
)

// loaded: the kinds the harness takes from the rendered file; the rest (NetworkPolicy, the Helm test
// hook Pod) no controller of KubeRay reads, and a Pod in the input would be mistaken for an operator's.
// A PriorityClass is the cluster's set-up a value may name (Priority admission refuses a pod naming none).
var loaded = map[string]bool{"ConfigMap": true, "Secret": true, "RayJob": true, "PriorityClass": true}

var clusterScoped = map[string]bool{"PriorityClass": true}

// kubelet plays the node's part between passes: it gives Pods and Jobs the status a real kubelet and Job
// controller would (there is no kube-controller-manager beside the API server).
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
	scheme     *runtime.Scheme
	client     client.Client // uncached: reads what the API server holds now
	mgr        recordingManager
	kubelet    kubelet
	kueue      *kueueManager // nil: no Kueue runs (yet)
	kueueStart func(ctx context.Context, namespaces []string) error
	settled    time.Time       // with Kueue: since when every RayJob was done
	input      map[string]bool // kind/namespace/name of what the input held
	mu         sync.Mutex
	seq        map[string][]statusStep
	order      []string
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

// readObjects decodes every document of the kinds the harness loads, as they were rendered: the API server
// sees them unchanged (created with strict field validation, an unknown field is its error).
func readObjects(path string) ([]*unstructured.Unstructured, error) {
	docs, err := readDocuments(path)
	if err != nil {
		return nil, err
	}
	var objs []*unstructured.Unstructured
	for _, u := range docs {
		if !loaded[u.GetKind()] {
			continue
		}
		if u.GetNamespace() == "" && !clusterScoped[u.GetKind()] {
			u.SetNamespace("default")
		}
		objs = append(objs, u)
	}
	return objs, nil
}

// readDocuments decodes every non-empty document of a multi-document YAML (or JSON) file, in order.
func readDocuments(path string) ([]*unstructured.Unstructured, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
	var docs []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return docs, nil
			}
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if len(u.Object) != 0 {
			docs = append(docs, u)
		}
	}
}

// newHarness creates the input on the API server (each namespace Pod Security "restricted" first) and
// sets KubeRay's RayJob and RayCluster reconcilers up in a manager, as the operator's main does.
func newHarness(ctx context.Context, cp *controlPlane, in string, provider utils.ClientProvider) (*harness, error) {
	s, err := newScheme()
	if err != nil {
		return nil, err
	}
	objs, err := readObjects(in)
	if err != nil {
		return nil, err
	}
	c, err := client.New(cp.cfg, client.Options{Scheme: s})
	if err != nil {
		return nil, err
	}
	h := &harness{scheme: s, client: c, input: map[string]bool{}, seq: map[string][]statusStep{}}
	namespaces := map[string]bool{}
	for _, o := range objs {
		if ns := o.GetNamespace(); ns != "" && !namespaces[ns] {
			if err := prepareNamespace(ctx, c, ns); err != nil {
				return nil, err
			}
			namespaces[ns] = true
		}
		if err := c.Create(ctx, o, client.FieldValidation("Strict")); err != nil {
			return nil, fmt.Errorf("the API server refused %s %s: %w", o.GetKind(), o.GetName(), err)
		}
		h.input[key(o.GetKind(), o)] = true
		if o.GetKind() == "RayJob" {
			h.order = append(h.order, o.GetNamespace()+"/"+o.GetName())
		}
	}
	if len(h.order) == 0 {
		return nil, fmt.Errorf("%s holds no RayJob", in)
	}
	mgr, err := ctrl.NewManager(cp.cfg, manager.Options{Scheme: s, Metrics: metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0", LeaderElection: false})
	if err != nil {
		return nil, err
	}
	h.mgr = recordingManager{Manager: mgr, refused: make(chan string, 1)}
	jobs := raycontrollers.NewRayJobReconciler(ctx, h.mgr, raycontrollers.RayJobReconcilerOptions{}, provider)
	if err := jobs.SetupWithManager(h.mgr, 1); err != nil {
		return nil, err
	}
	clusters := raycontrollers.NewReconciler(ctx, h.mgr, raycontrollers.RayClusterReconcilerOptions{})
	if err := clusters.SetupWithManager(h.mgr, 1); err != nil {
		return nil, err
	}
	// every RayJob status the watch delivers, in order: the sequence the operator wrote
	informer, err := mgr.GetCache().GetInformer(ctx, &rayv1.RayJob{})
	if err != nil {
		return nil, err
	}
	_, err = informer.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { h.record(obj) },
		UpdateFunc: func(_, obj any) { h.record(obj) },
	})
	return h, err
}

// loop runs the manager until every RayJob reached the mode's goal: its submitter Job exists (reconcile) or
// it is Complete/Failed (run), or Kueue keeps it waiting (reconcile, with -kueue). Each pass plays the
// kubelet and starts Kueue once every queued RayJob is held; the reconcilers run on the watches and their
// own requeues, as in a cluster.
func (h *harness) loop(ctx context.Context, mode string) error {
	mgrCtx, stopMgr := context.WithCancel(ctx)
	mgrDone := make(chan error, 1)
	go func() { mgrDone <- h.mgr.Start(mgrCtx) }()
	defer func() { stopMgr(); <-mgrDone }()
	settle := 0
	for pass := 1; ; pass++ {
		if err := h.kubelet.sync(ctx, h.client); err != nil {
			return err
		}
		var jobs rayv1.RayJobList // the input's RayJobs: the only ones there are
		if err := h.client.List(ctx, &jobs); err != nil {
			return err
		}
		if err := h.startKueueOnceHeld(ctx, jobs.Items); err != nil {
			return err
		}
		done, err := h.done(ctx, mode, jobs.Items)
		if err != nil {
			return err
		}
		if h.kueue != nil {
			if err := h.kueue.exited(); err != nil {
				return err
			}
			// Kueue admits one workload per scheduling cycle: done only once nothing changed for a while
			if !done {
				h.settled = time.Time{}
			} else if h.settled.IsZero() {
				h.settled = time.Now()
			}
			done = done && time.Since(h.settled) > kueueSettle
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
		case err := <-mgrDone:
			mgrDone <- err
			return fmt.Errorf("the operator's manager stopped: %v", err)
		case msg := <-h.mgr.refused:
			return fmt.Errorf("the API server refused what the operator made: %s", msg)
		case <-time.After(passDelay(mode)):
		}
	}
}

func passDelay(mode string) time.Duration {
	if mode == "run" {
		return time.Second
	}
	return 100 * time.Millisecond
}

// record appends a RayJob's status to its sequence when it changed.
func (h *harness) record(obj any) {
	job, ok := obj.(*rayv1.RayJob)
	if !ok {
		return
	}
	step := statusStep{string(job.Status.JobDeploymentStatus), string(job.Status.JobStatus),
		string(job.Status.Reason), job.Status.Message}
	nn := job.Namespace + "/" + job.Name
	h.mu.Lock()
	defer h.mu.Unlock()
	seq := h.seq[nn]
	if len(seq) == 0 || seq[len(seq)-1] != step {
		h.seq[nn] = append(seq, step)
		progress("rayjob %s: jobDeploymentStatus=%q jobStatus=%q %s", job.Name, step.JobDeploymentStatus, step.JobStatus, step.Message)
	}
}

// done: every RayJob reached the mode's goal.
func (h *harness) done(ctx context.Context, mode string, jobs []rayv1.RayJob) (bool, error) {
	queue, err := h.kueueSnapshot(ctx)
	if err != nil {
		return false, err
	}
	submitters := map[string]bool{}
	if mode == "reconcile" {
		var list batchv1.JobList
		if err := h.client.List(ctx, &list); err != nil {
			return false, err
		}
		for _, j := range list.Items {
			submitters[j.Namespace+"/"+j.Name] = true
		}
	}
	for _, job := range jobs {
		switch s := job.Status.JobDeploymentStatus; mode {
		case "reconcile":
			if queue.pending(&job) {
				continue
			}
			if !submitters[job.Namespace+"/"+job.Name] || s != rayv1.JobDeploymentStatusRunning {
				return false, nil
			}
		case "run":
			if s != rayv1.JobDeploymentStatusComplete && s != rayv1.JobDeploymentStatusFailed {
				return false, nil
			}
		}
	}
	return true, nil
}

func (h *harness) summary() string {
	h.mu.Lock()
	defer h.mu.Unlock()
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
	if h.kueue != nil {
		lists = append(lists, kueueLists()...)
	}
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
			if o.GetLabels()["provider"] == "kubernetes" { // the API server's own "kubernetes" Service
				continue
			}
			o.GetObjectKind().SetGroupVersionKind(gvk)
			scrub(o)
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
	h.mu.Lock()
	status, err := json.MarshalIndent(h.seq, "", "  ")
	h.mu.Unlock()
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
