package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/defaulting"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/yaml"
)

// crdSchemas does what the API server does to a ray.io object on every write and the fake client does
// not: prune unknown fields and apply the CRD's defaults (e.g. numOfHosts: 1, without which the operator
// creates no worker), with the apiextensions-apiserver's own code and KubeRay's CRD files.
type crdSchemas map[string]*structuralschema.Structural // kind -> schema of the served version

func loadCRDs(dir string) (crdSchemas, error) {
	out := crdSchemas{}
	for _, name := range []string{"ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"} {
		raw, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("KubeRay CRD: %w (-crds names the folder of ray.io_rayjobs.yaml and ray.io_rayclusters.yaml)", err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.Unmarshal(raw, &crd); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		for _, v := range crd.Spec.Versions {
			if v.Name != "v1" || v.Schema == nil || v.Schema.OpenAPIV3Schema == nil {
				continue
			}
			internal := &apiextensions.JSONSchemaProps{}
			if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(v.Schema.OpenAPIV3Schema, internal, nil); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			s, err := structuralschema.NewStructural(internal)
			if err != nil {
				return nil, fmt.Errorf("%s: not a structural schema: %w", name, err)
			}
			out[crd.Spec.Names.Kind] = s
		}
	}
	return out, nil
}

// apply prunes and defaults obj in place, through its unstructured form. A Secret's stringData is merged
// into data, as the API server does on every write (the operator writes the auth token as stringData).
func (c crdSchemas) apply(obj client.Object) error {
	var kind string
	switch o := obj.(type) {
	case *corev1.Secret:
		if len(o.StringData) > 0 && o.Data == nil {
			o.Data = map[string][]byte{}
		}
		for k, v := range o.StringData {
			o.Data[k] = []byte(v)
		}
		o.StringData = nil
		return nil
	case *rayv1.RayJob:
		kind = "RayJob"
	case *rayv1.RayCluster:
		kind = "RayCluster"
	default:
		return nil
	}
	s := c[kind]
	if s == nil {
		return nil
	}
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return err
	}
	pruning.Prune(u, s, true)
	defaulting.Default(u, s)
	return runtime.DefaultUnstructuredConverter.FromUnstructured(u, obj)
}

func (c crdSchemas) interceptors() interceptor.Funcs {
	return interceptor.Funcs{
		Create: func(ctx context.Context, cl client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			if err := c.apply(obj); err != nil {
				return err
			}
			return cl.Create(ctx, obj, opts...)
		},
		Update: func(ctx context.Context, cl client.WithWatch, obj client.Object, opts ...client.UpdateOption) error {
			if err := c.apply(obj); err != nil {
				return err
			}
			return cl.Update(ctx, obj, opts...)
		},
	}
}
