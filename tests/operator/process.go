package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// processKubelet (run mode) is a local kubelet and Job controller. Each Pod the operator creates, and the
// Pod of each submitter Job, runs its containers' commands exactly as written, with their env resolved
// (value, fieldRef, secretKeyRef, configMapKeyRef), as local processes (root needed):
//   - network: each pod has its own network namespace (so the operator's fixed ports, 6379, 8265, 8080,
//     52365 on 127.0.0.1 too, never collide with each other or with anything on the host), with eth0 on
//     10.244.0.N/24 bridged in a namespace of the harness's own (netns.go); nothing is routed off it. The
//     harness reaches pods (probes, the dashboard client) and forwards -forward ports (the S3 endpoint)
//     from inside that bridge namespace.
//   - files: a mount, PID and UTS namespace per pod (its hostname is the pod's name, as in Kubernetes:
//     gloo resolves it); /etc is an overlay there, so /etc/hosts maps each Service
//     name to the pod it selects and ConfigMap/Secret volumes appear at their mountPath; emptyDir volumes
//     are fresh folders; killing the namespace's first process ends every process of the pod.
//
// A pod is Ready when its readiness probe passes (httpGet/tcpSocket on its address), a Job Complete or
// Failed by its container's exit code, retried up to its backoffLimit.
type processKubelet struct {
	net   *podNetwork
	work  string
	mu    sync.Mutex
	pods  map[string]*localPod
	jobs  map[string]*localPod
	hosts map[string]string // Service DNS name -> address
	next  int
}

type localPod struct {
	name     string
	hostname string
	hosts    string // what its /etc/hosts holds now
	ip       string
	netns    string
	dir      string
	cmd      *exec.Cmd
	done     chan struct{}
	exitCode int
	attempts int
}

func newProcessKubelet(work string, forwards []string) (*processKubelet, error) {
	for _, tool := range []string{"unshare", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("run mode needs %s (util-linux, iproute2) and root: %w", tool, err)
		}
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	pn, err := newPodNetwork()
	if err != nil {
		return nil, err
	}
	k := &processKubelet{net: pn, work: work, pods: map[string]*localPod{}, jobs: map[string]*localPod{},
		hosts: map[string]string{}, next: 1}
	for _, f := range forwards {
		name, target, err := pn.forward(f)
		if err != nil {
			pn.close()
			return nil, err
		}
		k.hosts[name] = pn.gateway
		progress("forwarding %s to %s", f, target)
	}
	// KubeRay's dashboard client dials the head Service's cluster DNS name: resolve it as the pods'
	// /etc/hosts does and dial from inside the pod network; refuse anything else.
	http.DefaultTransport.(*http.Transport).DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		if ip, ok := k.lookup(host); ok {
			host = ip
		}
		if !pn.contains(host) {
			return nil, fmt.Errorf("harness: %s is not a pod address", addr)
		}
		return pn.dial(ctx, network, net.JoinHostPort(host, port))
	}
	return k, nil
}

func (k *processKubelet) lookup(host string) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ip, ok := k.hosts[strings.TrimSuffix(host, ".")]
	return ip, ok
}

func (k *processKubelet) sync(ctx context.Context, c client.Client) error {
	var pods corev1.PodList
	if err := c.List(ctx, &pods); err != nil {
		return err
	}
	if err := k.updateHosts(ctx, c, pods.Items); err != nil {
		return err
	}
	alive := map[string]bool{}
	for i := range pods.Items {
		pod := &pods.Items[i]
		alive[podKey(pod.ObjectMeta)] = true
		if err := k.syncPod(ctx, c, pod); err != nil && !apierrors.IsConflict(err) { // conflict: next pass
			return err
		}
	}
	for uid, lp := range k.pods { // the operator deleted the pod: end its processes
		if !alive[uid] {
			progress("pod %s: deleted, stopping it", lp.name)
			lp.stop()
			k.net.remove(lp)
			delete(k.pods, uid)
		}
	}
	var jobs batchv1.JobList
	if err := c.List(ctx, &jobs); err != nil {
		return err
	}
	liveJobs := map[string]bool{}
	for i := range jobs.Items {
		liveJobs[podKey(jobs.Items[i].ObjectMeta)] = true
		if err := k.syncJob(ctx, c, &jobs.Items[i]); err != nil && !apierrors.IsConflict(err) {
			return err
		}
	}
	for key, lp := range k.jobs { // deleted (a retried RayJob's submitter is deleted, then made again)
		if !liveJobs[key] {
			progress("job %s: deleted, stopping it", lp.name)
			lp.stop()
			k.net.remove(lp)
			delete(k.jobs, key)
		}
	}
	return nil
}

// updateHosts maps each Service's names (name, name.ns, name.ns.svc, name.ns.svc.cluster.local) to the
// address of the first running pod its selector matches.
func (k *processKubelet) updateHosts(ctx context.Context, c client.Client, pods []corev1.Pod) error {
	var svcs corev1.ServiceList
	if err := c.List(ctx, &svcs); err != nil {
		return err
	}
	k.mu.Lock()
	for _, svc := range svcs.Items {
		for _, pod := range pods {
			if pod.Status.PodIP == "" || len(svc.Spec.Selector) == 0 || !selects(svc.Spec.Selector, pod.Labels) {
				continue
			}
			for _, name := range []string{svc.Name, svc.Name + "." + svc.Namespace, svc.Name + "." + svc.Namespace + ".svc",
				svc.Name + "." + svc.Namespace + ".svc.cluster.local"} {
				k.hosts[name] = pod.Status.PodIP
			}
			break
		}
	}
	k.mu.Unlock()
	for _, lp := range k.pods { // a Service whose pod was replaced points at the new one, as DNS would
		if err := k.writeHosts(lp); err != nil {
			return err
		}
	}
	for _, lp := range k.jobs {
		if err := k.writeHosts(lp); err != nil {
			return err
		}
	}
	return nil
}

func selects(selector, labels map[string]string) bool {
	for key, v := range selector {
		if labels[key] != v {
			return false
		}
	}
	return true
}

func (k *processKubelet) syncPod(ctx context.Context, c client.Client, pod *corev1.Pod) error {
	lp, started := k.pods[podKey(pod.ObjectMeta)]
	if !started {
		k.next++
		lp = &localPod{name: pod.Name, dir: filepath.Join(k.work, pod.Name)}
		if err := k.net.add(lp, k.next); err != nil {
			return fmt.Errorf("pod %s: %w", pod.Name, err)
		}
		if err := k.start(ctx, c, lp, pod.Namespace, pod.ObjectMeta, &pod.Spec); err != nil {
			return fmt.Errorf("pod %s: %w", pod.Name, err)
		}
		k.pods[podKey(pod.ObjectMeta)] = lp
		pod.Status.Phase = corev1.PodPending
		pod.Status.PodIP, pod.Status.PodIPs = lp.ip, []corev1.PodIP{{IP: lp.ip}}
		return c.Status().Update(ctx, pod)
	}
	select {
	case <-lp.done:
		if pod.Status.Phase != corev1.PodFailed && pod.Status.Phase != corev1.PodSucceeded {
			progress("pod %s: exited with %d (log: %s)", pod.Name, lp.exitCode, filepath.Join(lp.dir, "log"))
			pod.Status.Phase = map[bool]corev1.PodPhase{true: corev1.PodSucceeded, false: corev1.PodFailed}[lp.exitCode == 0]
			pod.Status.Conditions = nil
			return c.Status().Update(ctx, pod)
		}
		return nil
	default:
	}
	if pod.Status.Phase == corev1.PodRunning || !k.ready(pod, lp.ip) {
		return nil
	}
	progress("pod %s: Running and Ready on %s", pod.Name, lp.ip)
	markRunning(pod, lp.ip)
	return c.Status().Update(ctx, pod)
}

// ready runs the Ray container's readiness probe once (httpGet or tcpSocket on the pod's address).
func (k *processKubelet) ready(pod *corev1.Pod, ip string) bool {
	probe := pod.Spec.Containers[0].ReadinessProbe
	if probe == nil {
		return true
	}
	switch {
	case probe.HTTPGet != nil:
		url := fmt.Sprintf("http://%s:%d%s", ip, probe.HTTPGet.Port.IntValue(), probe.HTTPGet.Path)
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(url)
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	case probe.TCPSocket != nil:
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		conn, err := k.net.dial(ctx, "tcp", net.JoinHostPort(ip, probe.TCPSocket.Port.String()))
		if err != nil {
			return false
		}
		return conn.Close() == nil
	}
	return true
}

func (k *processKubelet) syncJob(ctx context.Context, c client.Client, job *batchv1.Job) error {
	if _, finished := jobFinished(job); finished {
		return nil
	}
	lp, started := k.jobs[podKey(job.ObjectMeta)]
	if started {
		select {
		case <-lp.done:
		default:
			return nil
		}
		limit := int32(6)
		if job.Spec.BackoffLimit != nil {
			limit = *job.Spec.BackoffLimit
		}
		now := metav1.Now()
		if lp.exitCode == 0 {
			progress("job %s: Complete", job.Name)
			job.Status.Succeeded, job.Status.Active, job.Status.CompletionTime = 1, 0, &now
			job.Status.Conditions = append(job.Status.Conditions,
				batchv1.JobCondition{Type: batchv1.JobSuccessCriteriaMet, Status: corev1.ConditionTrue, LastTransitionTime: now},
				batchv1.JobCondition{Type: batchv1.JobComplete, Status: corev1.ConditionTrue, LastTransitionTime: now})
			return c.Status().Update(ctx, job)
		}
		job.Status.Failed++
		if job.Status.Failed > limit {
			progress("job %s: Failed (exit %d, %d attempts)", job.Name, lp.exitCode, lp.attempts)
			job.Status.Active = 0
			job.Status.Conditions = append(job.Status.Conditions,
				batchv1.JobCondition{Type: batchv1.JobFailureTarget, Status: corev1.ConditionTrue, LastTransitionTime: now, Reason: "BackoffLimitExceeded"},
				batchv1.JobCondition{Type: batchv1.JobFailed, Status: corev1.ConditionTrue, LastTransitionTime: now, Reason: "BackoffLimitExceeded"})
			return c.Status().Update(ctx, job)
		}
		progress("job %s: attempt %d exited %d, retrying", job.Name, lp.attempts, lp.exitCode)
		if err := c.Status().Update(ctx, job); err != nil {
			return err
		}
	} else {
		k.next++
		lp = &localPod{name: job.Name}
		if err := k.net.add(lp, k.next); err != nil {
			return fmt.Errorf("job %s: %w", job.Name, err)
		}
		k.jobs[podKey(job.ObjectMeta)] = lp
	}
	lp.attempts++
	lp.dir = filepath.Join(k.work, fmt.Sprintf("%s-%d", job.Name, lp.attempts))
	meta := job.Spec.Template.ObjectMeta
	meta.Name, meta.Namespace = fmt.Sprintf("%s-%d", job.Name, lp.attempts), job.Namespace
	if err := k.start(ctx, c, lp, job.Namespace, meta, &job.Spec.Template.Spec); err != nil {
		return fmt.Errorf("job %s: %w", job.Name, err)
	}
	job.Status.Active = 1
	if job.Status.StartTime == nil { // the API server refuses a finished Job without one
		now := metav1.Now()
		job.Status.StartTime = &now
	}
	return c.Status().Update(ctx, job)
}

func jobFinished(job *batchv1.Job) (batchv1.JobConditionType, bool) {
	for _, cond := range job.Status.Conditions {
		if (cond.Type == batchv1.JobComplete || cond.Type == batchv1.JobFailed) && cond.Status == corev1.ConditionTrue {
			return cond.Type, true
		}
	}
	return "", false
}

func (lp *localPod) stop() {
	if lp.cmd == nil || lp.cmd.Process == nil {
		return
	}
	select {
	case <-lp.done:
		return
	default:
	}
	_ = syscall.Kill(-lp.cmd.Process.Pid, syscall.SIGKILL) // unshare --kill-child: the pod's PID namespace goes with it
	<-lp.done
}

func (k *processKubelet) stopAll() {
	for _, lp := range k.pods {
		lp.stop()
	}
	for _, lp := range k.jobs {
		lp.stop()
	}
	k.net.close()
}

// podKey: namespace/name.
func podKey(m metav1.ObjectMeta) string { return m.Namespace + "/" + m.Name }
