package main

import (
	"context"
	"fmt"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// statusKubelet (reconcile mode) runs nothing: it reports every new Pod Running and Ready on its own
// loopback address (127.0.0.3, .4, ... in creation order), which is all the RayCluster reconciler waits for
// before the RayJob reconciler creates the submitter Job. It also plays the Job controller's first step:
// each Job gets its Pod, created on the API server, so admission sees the submitter's pod too.
type statusKubelet struct{}

func (statusKubelet) sync(ctx context.Context, c client.Client) error {
	var pods corev1.PodList
	if err := c.List(ctx, &pods); err != nil {
		return err
	}
	if err := makeJobPods(ctx, c, pods.Items); err != nil {
		return err
	}
	for i := range pods.Items {
		pod := &pods.Items[i]
		if pod.Status.PodIP != "" { // the API server makes every pod Pending: an address says a kubelet took it
			continue
		}
		markRunning(pod, nextIP(ctx, c))
		if err := c.Status().Update(ctx, pod); apierrors.IsConflict(err) {
			continue // written meanwhile: the next pass sees it again
		} else if err != nil {
			return fmt.Errorf("pod %s status: %w", pod.Name, err)
		}
	}
	return nil
}

// makeJobPods makes the Pod the Job controller would make of each Job's template that has none yet
// (once: this Job controller never retries), named and labelled as the real one does.
func makeJobPods(ctx context.Context, c client.Client, pods []corev1.Pod) error {
	var jobs batchv1.JobList
	if err := c.List(ctx, &jobs); err != nil {
		return err
	}
	hasPod := map[string]bool{}
	for _, pod := range pods {
		hasPod[pod.Namespace+"/"+pod.Labels[batchv1.JobNameLabel]] = true
	}
	for i := range jobs.Items {
		if job := &jobs.Items[i]; !hasPod[job.Namespace+"/"+job.Name] {
			if err := makeJobPod(ctx, c, job); err != nil {
				return err
			}
		}
	}
	return nil
}

func makeJobPod(ctx context.Context, c client.Client, job *batchv1.Job) error {
	tmpl := job.Spec.Template
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: job.Name + "-", Namespace: job.Namespace,
		Labels: map[string]string{batchv1.JobNameLabel: job.Name}, Annotations: tmpl.Annotations,
		OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(job, batchv1.SchemeGroupVersion.WithKind("Job"))}},
		Spec: *tmpl.Spec.DeepCopy()}
	for k, v := range tmpl.Labels { // the API server put the job-name and controller-uid labels here
		pod.Labels[k] = v
	}
	if err := c.Create(ctx, pod); err != nil {
		return fmt.Errorf("the API server refused the pod of Job %s: %w", job.Name, err)
	}
	progress("job %s: made pod %s", job.Name, pod.Name)
	return nil
}

var ipCounter = 1

func nextIP(context.Context, client.Client) string {
	ipCounter++
	return fmt.Sprintf("127.0.%d.%d", ipCounter/250, ipCounter%250+2)
}

func markRunning(pod *corev1.Pod, ip string) {
	now := metav1.Now()
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = ip
	pod.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	pod.Status.StartTime = &now
	for _, t := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		pod.Status.Conditions = append(pod.Status.Conditions, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	pod.Status.ContainerStatuses = nil
	for _, ctr := range pod.Spec.Containers {
		pod.Status.ContainerStatuses = append(pod.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: ctr.Name, Image: ctr.Image, Ready: true, Started: ptr(true),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}})
	}
}

func ptr[T any](v T) *T { return &v }
