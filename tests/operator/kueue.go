package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
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
