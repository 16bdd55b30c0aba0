package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// kueueManager is Kueue's own manager (sigs.k8s.io/kueue's cmd/kueue, unmodified, built by
// `scripts/install.sh kueue`) running beside the reconcilers against the same API server, so a queued
// RayJob is admitted by Kueue's controllers and scheduler, not by the harness: Kueue makes the Workload,
// reserves quota in the ClusterQueue of the LocalQueue the RayJob names, and clears spec.suspend.
//
// How it runs differs from Kueue's Deployment only where there is no cluster:
//   - its Configuration (kueueConfig) enables the ray.io/rayjob integration alone, with no leader election,
//     no metrics or probe listeners, and no visibility API server (an aggregated API needs the cluster's
//     front proxy);
//   - internalCertManagement is off: its cert rotator would inject a CA into webhook configurations and CRD
//     conversion webhooks that are not installed here (Kueue's CRDs go in with conversion None; no
//     webhook configuration points at Kueue, so its webhooks never run). The webhook server still
//     starts and needs a certificate: a self-signed one for 127.0.0.1 is written to webhook.certDir;
//   - with internal certificates off, Kueue reads its metrics certificate from the fixed path
//     /etc/kueue/metrics/certs (its Deployment mounts a Secret there): the manager runs in a private mount
//     namespace whose /etc is an overlay holding that folder (root needed), so the host's /etc is untouched.
type kueueManager struct {
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

const kueueNamespace = "kueue-system"

var (
	workloadGVK     = schema.GroupVersionKind{Group: "kueue.x-k8s.io", Version: "v1beta2", Kind: "Workload"}
	clusterQueueGVK = schema.GroupVersionKind{Group: "kueue.x-k8s.io", Version: "v1beta2", Kind: "ClusterQueue"}
)

// kueueConfig: the Configuration API (config.kueue.x-k8s.io/v1beta2, what v0.19's main.go loads).
func kueueConfig(certDir string, webhookPort int) string {
	return fmt.Sprintf(`apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: %s
manageJobsWithoutQueueName: false
integrations:
  frameworks: ["ray.io/rayjob"]
leaderElection:
  leaderElect: false
health:
  healthProbeBindAddress: "0"
metrics:
  bindAddress: "0"
webhook:
  host: 127.0.0.1
  port: %d
  certDir: %s
internalCertManagement:
  enable: false
featureGates:
  VisibilityOnDemand: false
`, kueueNamespace, webhookPort, certDir)
}

// startKueue writes the manager's kubeconfig (the harness's own credentials), configuration and
// certificates under dir and starts it; its log goes to dir/log.
func startKueue(bin, dir string, cfg *rest.Config) (*kueueManager, error) {
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("Kueue manager: %w (build it with `scripts/install.sh kueue`)", err)
	}
	certs := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certs, 0o755); err != nil {
		return nil, err
	}
	if err := writeSelfSignedCert(certs); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(kubeconfigFor(cfg), kubeconfig); err != nil {
		return nil, err
	}
	config := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(config, []byte(kueueConfig(certs, port)), 0o644); err != nil {
		return nil, err
	}
	ns := filepath.Join(dir, "ns")
	if err := os.MkdirAll(ns, 0o755); err != nil {
		return nil, err
	}
	script := `set -e
mount -t tmpfs tmpfs "$KUEUE_DIR/ns"
mkdir -p "$KUEUE_DIR/ns/u" "$KUEUE_DIR/ns/w"
mount -t overlay overlay -o lowerdir=/etc,upperdir="$KUEUE_DIR/ns/u",workdir="$KUEUE_DIR/ns/w" /etc
mkdir -p /etc/kueue/metrics/certs
cp "$KUEUE_DIR/certs/tls.crt" "$KUEUE_DIR/certs/tls.key" /etc/kueue/metrics/certs/
exec "$KUEUE_BIN" --config "$KUEUE_DIR/config.yaml" --zap-log-level=info
`
	log, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--fork", "--kill-child",
		"/bin/bash", "-c", script)
	cmd.Env = append(os.Environ(), "KUEUE_DIR="+dir, "KUEUE_BIN="+bin, "KUBECONFIG="+kubeconfig)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		_ = log.Close()
		return nil, fmt.Errorf("start Kueue (unshare, root needed): %w", err)
	}
	k := &kueueManager{dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		_ = log.Close()
		close(k.done)
	}()
	progress("kueue: manager started (%s)", filepath.Join(dir, "log"))
	return k, nil
}

// stop ends the manager and everything in its namespace (--kill-child).
func (k *kueueManager) stop() {
	if k == nil || k.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-k.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
		<-k.done
	}
}

// exited: a non-nil error once the manager is gone, with the last lines of its log.
func (k *kueueManager) exited() error {
	select {
	case <-k.done:
		return fmt.Errorf("Kueue's manager exited (%s): %s", k.cmd.ProcessState, k.logTail(800))
	default:
		return nil
	}
}

func (k *kueueManager) logTail(n int) string {
	raw, _ := os.ReadFile(filepath.Join(k.dir, "log"))
	if len(raw) > n {
		raw = raw[len(raw)-n:]
	}
	return strings.TrimSpace(string(raw))
}

// applyQueues creates the objects of a Kueue queue file (deploy/kueue/queues.yaml: ResourceFlavor,
// ClusterQueue, LocalQueue) for each namespace whose RayJobs name a queue, then waits until Kueue reports every
// ClusterQueue Active: from then on its scheduler admits into it. Each namespace is one case of the tests,
// as if alone on its cluster, so it gets a ClusterQueue of its own: NAME-NAMESPACE, selecting only that
// namespace, with the file's resource groups and quota unchanged; the file's LocalQueues are made in that
// namespace pointing at it. Other cluster-scoped objects (ResourceFlavors) are created once, as written.
func (k *kueueManager) applyQueues(ctx context.Context, c client.Client, path string, namespaces []string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("Kueue queues: %w", err)
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(raw), 4096)
	var objs []*unstructured.Unstructured
	for {
		u := &unstructured.Unstructured{}
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return fmt.Errorf("%s: %w", path, err)
		}
		if len(u.Object) != 0 {
			objs = append(objs, u)
		}
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

// workloadFor: the Workload Kueue made for a RayJob (labelled with the job's UID), or nil.
func workloadFor(ctx context.Context, c client.Client, namespace, uid string) (*unstructured.Unstructured, error) {
	list := &unstructured.UnstructuredList{}
	list.SetGroupVersionKind(workloadGVK.GroupVersion().WithKind("WorkloadList"))
	if err := c.List(ctx, list, client.InNamespace(namespace),
		client.MatchingLabels{"kueue.x-k8s.io/job-uid": uid}); err != nil {
		if meta.IsNoMatchError(err) {
			return nil, nil
		}
		return nil, err
	}
	if len(list.Items) == 0 {
		return nil, nil
	}
	return &list.Items[0], nil
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

// kubeconfigFor: a kubeconfig carrying the same server and credentials as cfg.
func kubeconfigFor(cfg *rest.Config) clientcmdapi.Config {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["harness"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthority: cfg.CAFile,
		CertificateAuthorityData: cfg.CAData, InsecureSkipTLSVerify: cfg.Insecure}
	kc.AuthInfos["harness"] = &clientcmdapi.AuthInfo{ClientCertificate: cfg.CertFile, ClientKey: cfg.KeyFile,
		ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken,
		TokenFile: cfg.BearerTokenFile, Username: cfg.Username, Password: cfg.Password}
	kc.Contexts["harness"] = &clientcmdapi.Context{Cluster: "harness", AuthInfo: "harness"}
	kc.CurrentContext = "harness"
	return *kc
}

// writeSelfSignedCert: tls.crt/tls.key for 127.0.0.1, good for a day (Kueue's webhook and metrics servers
// refuse to start without one; nothing here connects to them).
func writeSelfSignedCert(dir string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kueue-harness"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "tls.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "tls.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
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
