// etcd for the project's local control plane, at the version kube-apiserver's own module
// requires (go.etcd.io/etcd/server/v3 is already in its module graph).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
