package main

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// recordingManager is the controller-runtime Manager KubeRay's reconcilers run in, with one addition: a
// Warning event whose reason starts "FailedToCreate" and whose message is the API server's refusal
// (Forbidden, e.g. Pod Security refused a head pod, or Invalid) ends the harness with that message,
// instead of a retry loop that would only end at the timeout. Other failures (a stale cache's conflict,
// shutdown) stay the operator's to retry.
type recordingManager struct {
	manager.Manager
	refused chan string
}

func (m recordingManager) GetEventRecorderFor(name string) record.EventRecorder {
	return refusalRecorder{EventRecorder: m.Manager.GetEventRecorderFor(name), refused: m.refused}
}

type refusalRecorder struct {
	record.EventRecorder
	refused chan string
}

func (r refusalRecorder) Event(obj runtime.Object, eventtype, reason, message string) {
	r.EventRecorder.Event(obj, eventtype, reason, message)
	r.check(eventtype, reason, message)
}

func (r refusalRecorder) Eventf(obj runtime.Object, eventtype, reason, format string, args ...any) {
	r.EventRecorder.Eventf(obj, eventtype, reason, format, args...)
	r.check(eventtype, reason, fmt.Sprintf(format, args...))
}

func (r refusalRecorder) check(eventtype, reason, message string) {
	if eventtype != corev1.EventTypeWarning {
		return
	}
	progress("event %s: %s", reason, message)
	if strings.HasPrefix(reason, "FailedToCreate") && (strings.Contains(message, " is forbidden: ") || strings.Contains(message, " is invalid: ")) {
		select {
		case r.refused <- reason + ": " + message:
		default:
		}
	}
}
