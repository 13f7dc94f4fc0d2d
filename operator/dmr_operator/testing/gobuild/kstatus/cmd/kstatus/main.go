// Flux's health verdict on one object, for the project's GitOps tests: the object's JSON on
// stdin, kstatus's (sigs.k8s.io/cli-utils/pkg/kstatus) result on stdout as
// {"status": "InProgress|Current|Failed|Terminating|...", "message": "..."}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: reading the object: %v\n", err)
		os.Exit(2)
	}
	// Decoded as the API machinery decodes objects (integers as int64, as kstatus expects).
	object := &unstructured.Unstructured{}
	if err := object.UnmarshalJSON(data); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: decoding the object: %v\n", err)
		os.Exit(2)
	}
	result, err := status.Compute(object)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
	out, err := json.Marshal(map[string]string{
		"status":  result.Status.String(),
		"message": result.Message,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}
