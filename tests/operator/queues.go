package main

import (
	"context"
	"fmt"
	"time"

	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// What Kueue's manager (kueue.go) is given and what it decided: the queues of a queue file, made for each
// case's namespace; when the harness starts it; one look per pass at its Workloads and ClusterQueues.

var (
	workloadGVK     = schema.GroupVersionKind{Group: "kueue.x-k8s.io", Version: "v1beta2", Kind: "Workload"}
	clusterQueueGVK = schema.GroupVersionKind{Group: "kueue.x-k8s.io", Version: "v1beta2", Kind: "ClusterQueue"}
)

// applyQueues creates the objects of a Kueue queue file (deploy/kueue/queues.yaml: ResourceFlavor,
// ClusterQueue, LocalQueue) for each namespace whose RayJobs name a queue, then waits until Kueue reports every
// ClusterQueue Active: from then on its scheduler admits into it. Each namespace is one case of the tests,
// as if alone on its cluster, so it gets a ClusterQueue of its own: NAME-NAMESPACE, selecting only that
// namespace, with the file's resource groups and quota unchanged; the file's LocalQueues are made in that
// namespace pointing at it. Other cluster-scoped objects (ResourceFlavors) are created once, as written.
func (k *kueueManager) applyQueues(ctx context.Context, c client.Client, path string, namespaces []string) error {
	objs, err := readDocuments(path)
	if err != nil {
		return fmt.Errorf("Kueue queues: %w", err)
	}
	var queues []string
	create := func(u *unstructured.Unstructured) error {
		if err := c.Create(ctx, u); err != nil {
			return fmt.Errorf("%s: the API server refused %s %s: %w", path, u.GetKind(), u.GetName(), err)
		}
		if u.GetKind() == "ClusterQueue" {
			queues = append(queues, u.GetName())
		}
		return nil
	}
	for _, u := range objs {
		if u.GetKind() != "ClusterQueue" && u.GetKind() != "LocalQueue" {
			if err := create(u); err != nil {
				return err
			}
		}
	}
	for _, ns := range namespaces {
		for _, u := range objs {
			u = u.DeepCopy()
			switch u.GetKind() {
			case "ClusterQueue":
				u.SetName(u.GetName() + "-" + ns)
				selector := map[string]any{"matchLabels": map[string]any{"kubernetes.io/metadata.name": ns}}
				if err := unstructured.SetNestedMap(u.Object, selector, "spec", "namespaceSelector"); err != nil {
					return err
				}
			case "LocalQueue":
				u.SetNamespace(ns)
				cq, _, _ := unstructured.NestedString(u.Object, "spec", "clusterQueue")
				if err := unstructured.SetNestedField(u.Object, cq+"-"+ns, "spec", "clusterQueue"); err != nil {
					return err
				}
			default:
				continue
			}
			if err := create(u); err != nil {
				return err
			}
		}
	}
	for _, name := range queues {
		if err := k.waitActive(ctx, c, name); err != nil {
			return err
		}
	}
	return nil
}

func (k *kueueManager) waitActive(ctx context.Context, c client.Client, name string) error {
	for {
		cq := &unstructured.Unstructured{}
		cq.SetGroupVersionKind(clusterQueueGVK)
		if err := c.Get(ctx, client.ObjectKey{Name: name}, cq); err != nil {
			return err
		}
		if cond := condition(cq, "Active"); cond != nil && cond["status"] == "True" {
			progress("kueue: ClusterQueue %s is Active", name)
			return nil
		}
		if err := k.exited(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("Kueue never reported ClusterQueue %s Active (%v); its log: %s", name,
				condition(cq, "Active"), k.logTail(800))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// condition: status.conditions[type] of any object, or nil.
func condition(u *unstructured.Unstructured, kind string) map[string]any {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == kind {
			return m
		}
	}
	return nil
}

// kueueSettle: how long every RayJob must have stayed admitted-and-running or pending before the harness
// stops (Kueue admits one workload per scheduling cycle, so "nothing changed" needs a little time).
const kueueSettle = 2 * time.Second

// kueueView: one look at what Kueue decided, taken once per pass.
type kueueView struct {
	byJob   map[string]*unstructured.Unstructured // RayJob UID -> its Workload
	settled map[string]bool                       // namespace -> Kueue has evaluated its queue (below)
}

// kueueSnapshot lists the Workloads and ClusterQueues. A namespace is settled when its ClusterQueue
// counts every Workload of the namespace as reserving or pending (Kueue's queue manager has them all) and
// Kueue's scheduler has decided at least one of them (a QuotaReserved condition, True or False): Kueue
// sets the "Pending" reason on the workload it tried, not on every one behind it in the queue.
func (h *harness) kueueSnapshot(ctx context.Context) (*kueueView, error) {
	v := &kueueView{byJob: map[string]*unstructured.Unstructured{}, settled: map[string]bool{}}
	if h.kueue == nil {
		return v, nil
	}
	workloads := &unstructured.UnstructuredList{}
	workloads.SetGroupVersionKind(workloadGVK.GroupVersion().WithKind("WorkloadList"))
	queues := &unstructured.UnstructuredList{}
	queues.SetGroupVersionKind(clusterQueueGVK.GroupVersion().WithKind("ClusterQueueList"))
	if err := h.client.List(ctx, workloads); err != nil {
		return nil, err
	}
	if err := h.client.List(ctx, queues); err != nil {
		return nil, err
	}
	count, decided := map[string]int64{}, map[string]bool{}
	for i := range workloads.Items {
		wl := &workloads.Items[i]
		v.byJob[wl.GetLabels()["kueue.x-k8s.io/job-uid"]] = wl
		count[wl.GetNamespace()]++
		decided[wl.GetNamespace()] = decided[wl.GetNamespace()] || condition(wl, "QuotaReserved") != nil
	}
	for _, cq := range queues.Items {
		ns, _, _ := unstructured.NestedString(cq.Object, "spec", "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")
		pending, _, _ := unstructured.NestedInt64(cq.Object, "status", "pendingWorkloads")
		reserving, _, _ := unstructured.NestedInt64(cq.Object, "status", "reservingWorkloads")
		v.settled[ns] = decided[ns] && pending+reserving == count[ns]
	}
	return v, nil
}

// pending: Kueue keeps the RayJob waiting: it is still suspended, its Workload is not admitted, and Kueue
// has settled its namespace's queue.
func (v *kueueView) pending(job *rayv1.RayJob) bool {
	wl := v.byJob[string(job.UID)]
	if !job.Spec.Suspend || wl == nil || !v.settled[job.Namespace] {
		return false
	}
	admitted := condition(wl, "Admitted")
	return admitted == nil || admitted["status"] != "True"
}

// kueueLists: what the harness writes out of Kueue's objects: the Workloads (their podSets, admission and
// conditions) and the ClusterQueues (their usage).
func kueueLists() []client.ObjectList {
	var lists []client.ObjectList
	for _, gvk := range []schema.GroupVersionKind{workloadGVK, clusterQueueGVK} {
		l := &unstructured.UnstructuredList{}
		l.SetGroupVersionKind(gvk.GroupVersion().WithKind(gvk.Kind + "List"))
		lists = append(lists, l)
	}
	return lists
}

// startKueueOnceHeld starts Kueue (h.kueueStart) once the operator reports every suspended RayJob
// Suspended, so each status sequence shows the operator holding the job until Kueue admits it. In a
// cluster both controllers run all along and which one sees a new RayJob first is a race; the reconcilers
// handle either order (a RayJob unsuspended before the operator saw it goes straight to Initializing).
func (h *harness) startKueueOnceHeld(ctx context.Context, jobs []rayv1.RayJob) error {
	if h.kueueStart == nil {
		return nil
	}
	var queued []string // the namespaces whose RayJobs name a queue, each once
	seen := map[string]bool{}
	for _, job := range jobs {
		if job.Spec.Suspend && job.Status.JobDeploymentStatus != rayv1.JobDeploymentStatusSuspended {
			return nil
		}
		if _, ok := job.Labels["kueue.x-k8s.io/queue-name"]; ok && !seen[job.Namespace] {
			seen[job.Namespace] = true
			queued = append(queued, job.Namespace)
		}
	}
	start := h.kueueStart
	h.kueueStart = nil
	return start(ctx, queued)
}
