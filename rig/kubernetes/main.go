// Command k8s-rig is the Kubernetes control plane of microscaler's test rig: one binary that
// runs kube-apiserver, kube-controller-manager, kube-scheduler or kubectl, chosen by the name
// it is called by (a symlink) or by its first argument:
//
//	kube-apiserver --etcd-servers=...        (through a symlink named kube-apiserver)
//	k8s-rig kube-scheduler --kubeconfig=...  (the command as the first argument)
//
// The commands themselves are upstream's (k8s.io/kubernetes/cmd/*/app), built from the Go
// module proxy; scripts/k8s-rig.sh builds, starts and checks the rig. Each command runs in a
// process of its own: their flags and feature gates are process-global state.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones, as upstream's mains do

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // the version metric
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var commands = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler": func() *cobra.Command {
		return scheduler.NewSchedulerCommand()
	},
	"kubectl": kubectl.NewDefaultKubectlCommand,
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: %s COMMAND [flags]  (or call it through a symlink named COMMAND)\ncommands: %v\n",
		filepath.Base(os.Args[0]), names)
}

func main() {
	name := filepath.Base(os.Args[0])
	newCommand, ok := commands[name]
	if !ok {
		if len(os.Args) < 2 {
			usage()
			os.Exit(2)
		}
		name = os.Args[1]
		if newCommand, ok = commands[name]; !ok {
			fmt.Fprintf(os.Stderr, "%s: unknown command %q\n", filepath.Base(os.Args[0]), name)
			usage()
			os.Exit(2)
		}
		// The command sees itself called by its own name, as through the symlink.
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	if name == "kubectl" {
		// As upstream's kubectl main: verbosity first (klog is used while the command is
		// built), errors printed kubectl's way.
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) //nolint:errcheck
		if err := cli.RunNoErrOutput(newCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	os.Exit(cli.Run(newCommand()))
}
