package main

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// statusKubelet (reconcile mode) runs nothing: it reports every new Pod Running and Ready on its own
// loopback address (127.0.0.2, .3, ... in creation order), which is all the RayCluster reconciler waits for
// before the RayJob reconciler creates the submitter Job.
type statusKubelet struct{}

func (statusKubelet) sync(ctx context.Context, c client.Client) error {
	var pods corev1.PodList
	if err := c.List(ctx, &pods); err != nil {
		return err
	}
	for i := range pods.Items {
		pod := &pods.Items[i]
		if pod.Status.Phase != "" {
			continue
		}
		markRunning(pod, nextIP(ctx, c))
		if err := c.Status().Update(ctx, pod); err != nil {
			return fmt.Errorf("pod %s status: %w", pod.Name, err)
		}
	}
	return nil
}

var ipCounter = 1

func nextIP(context.Context, client.Client) string {
	ipCounter++
	return fmt.Sprintf("127.0.0.%d", ipCounter)
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
