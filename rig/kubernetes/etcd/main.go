// Command etcd is the etcd server of microscaler's Kubernetes test rig: upstream's etcdmain
// (go.etcd.io/etcd/server/v3, from the Go module proxy) behind a main of ours. Debian
// bookworm's etcd-server (3.4.23) runs too, but kube-apiserver 1.37 then switches off
// RequestWatchProgress, and every client-go >= 1.35 informer's streaming list (WatchListClient)
// is refused and falls back; an etcd of the same generation as the apiserver's client
// (v3.7) behaves as a real cluster's does. scripts/k8s-rig.sh builds and starts it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
